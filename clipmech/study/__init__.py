"""The end-to-end study: quickstart pipeline, figures, results registry and report.

`clipmech.study.figures` (plain data -> PNG) and `clipmech.study.report` (results.json, report.md)
are light to import; `clipmech.study.quickstart` composes the models, data, train, eval and analysis
packages into the `clipmech quickstart` command.
"""
