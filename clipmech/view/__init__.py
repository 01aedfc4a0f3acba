"""A study as a static web site (`clipmech view DIR`): it reads a study's files, it computes nothing.

`clipmech.view.results` is the one place that reads results.json fields, `locate` finds the
per-model files (CKA, circuits), `explanations` reads node explanations, `site` writes the pages;
the page script and styles are in `assets/`. Nothing here imports torch.
"""
