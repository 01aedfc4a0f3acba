"""The analysis plan: one versioned TOML file, shipped with the package and fixed before a
confirmatory run, that names the findings, their primary measures and variants, contrasts, sides,
alpha and rules (`plans/plan-v1.toml`, read it for the current rules).

Why a file and not constants: a verdict is confirmatory only when its rules were fixed before the
data were seen. The file's hash goes into results.json; `clipmech report --plan FILE` re-judges a run
under another plan, and that report is labelled exploratory, as is one whose seeds are not the plan's
`confirmatory_seeds` (seeds already looked at when the plan was written).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterable, Mapping

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport pyproject.toml declares
    import tomli as tomllib

from clipmech.errors import ConfigError

DEFAULT_PLAN = "plan-v1.toml"
RULES = ("all", "one", "any", "holm_measures", "sign_flip")
_REQUIRED = {"version": int, "alpha": float, "mc_level": float, "n_boot": int, "max_boot": int,
             "confirmatory_seeds": list, "findings": list}


@dataclass(frozen=True)
class Plan:
    """A parsed analysis plan: `data` (the TOML's content), `sha256` (first 16 hex of the file's bytes),
    `source` (path or "clipmech:plans/<name>") and `shipped` (the package's own plan)."""

    data: Mapping[str, Any]
    sha256: str
    source: str
    shipped: bool = field(default=False)

    def finding(self, fid: str) -> Mapping[str, Any]:
        """The finding with id `fid`; KeyError naming the plan's ids."""
        for f in self.data["findings"]:
            if f["id"] == fid:
                return f
        raise KeyError(f"plan {self.source} has no finding {fid!r}; it has {[f['id'] for f in self.data['findings']]}")

    def status(self, seeds: Iterable[int]) -> str:
        """"confirmatory" when this is the shipped plan and every seed is one of its confirmatory seeds,
        else "exploratory" with the reason."""
        seeds = sorted(set(int(s) for s in seeds))
        if not self.shipped:
            return f"exploratory (judged under {self.source}, not the shipped plan)"
        seen = [s for s in seeds if s not in self.data["confirmatory_seeds"]]
        if seen or not seeds:
            return (f"exploratory (seeds {seen} are not the plan's confirmatory seeds "
                    f"{self.data['confirmatory_seeds']})")
        return "confirmatory"

    def record(self, seeds: Iterable[int]) -> dict[str, Any]:
        """What results.json keeps of the plan: version, hash, source and status."""
        return {"version": self.data["version"], "sha256": self.sha256, "source": self.source,
                "status": self.status(seeds)}


def shipped_plan(name: str) -> tuple[dict[str, Any], str]:
    """(parsed TOML, first 16 hex of the file's sha256) of a plan shipped in clipmech/study/plans/."""
    raw = (files("clipmech.study") / "plans" / name).read_bytes()
    return tomllib.loads(raw.decode("utf-8")), hashlib.sha256(raw).hexdigest()[:16]


def load_plan(path: str | Path | None = None) -> Plan:
    """The plan at `path`, or the shipped DEFAULT_PLAN. Raises ValueError naming the file and every
    missing or mistyped key, an unknown rule or a finding without id."""
    if path is None:
        raw, source, shipped = (files("clipmech.study") / "plans" / DEFAULT_PLAN).read_bytes(), \
            f"clipmech:plans/{DEFAULT_PLAN}", True
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"analysis plan {p} does not exist; pass a TOML file like clipmech's "
                                    f"plans/{DEFAULT_PLAN}")
        raw, source, shipped = p.read_bytes(), str(p), False
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"analysis plan {source} is not valid TOML: {err}") from err
    problems = [f"{k!r} missing" if k not in data else f"{k!r} must be {t.__name__}"
                for k, t in _REQUIRED.items() if not isinstance(data.get(k), t)]
    for i, f in enumerate(data.get("findings") or []):
        if not f.get("id"):
            problems.append(f"findings[{i}] has no id")
        if f.get("rule") not in RULES:
            problems.append(f"findings[{i}].rule {f.get('rule')!r} is not one of {RULES}")
    if not problems and not 0 < data["alpha"] < 1:
        problems.append(f"alpha {data['alpha']} is not in (0, 1)")
    if problems:
        raise ConfigError(f"analysis plan {source}: " + "; ".join(problems))
    return Plan(data, hashlib.sha256(raw).hexdigest()[:16], source, shipped)
