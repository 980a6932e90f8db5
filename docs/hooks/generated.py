"""MkDocs hook: the pages generated at build time, so none can drift from its source.

- configuration.md: the tables of every key, from rlsr_ray/config/schema.py (rlsr_ray.config.reference);
- index.md: README.md, its links into docs/ made relative to the site;
- presets.md: the shipped presets, each with the comment it opens with and the keys it sets.
"""
import re
import sys
from pathlib import Path

MARKERS = {"configuration.md": "<!-- config-reference -->", "index.md": "<!-- readme -->",
           "presets.md": "<!-- presets -->"}


def on_page_markdown(markdown: str, page, config, files) -> str:
    marker = MARKERS.get(page.file.src_uri)
    if marker is None:
        return markdown
    if marker not in markdown:
        raise ValueError(f"docs/{page.file.src_uri}: the marker {marker} is missing")
    root = Path(config.config_file_path).resolve().parent
    if page.file.src_uri == "index.md":
        readme = (root / "README.md").read_text()
        return markdown.replace(marker, re.sub(r"\]\(docs/([^)]+)\)", r"](\1)", readme))
    if page.file.src_uri == "presets.md":
        return markdown.replace(marker, presets(root / "rlsr_ray" / "presets"))
    if str(root) not in sys.path:  # the checkout's own code, installed or not
        sys.path.insert(0, str(root))
    from rlsr_ray.config.reference import markdown as reference

    return markdown.replace(marker, reference())


def presets(folder: Path) -> str:
    """A section per shipped preset: its opening comment, and the file itself folded away."""
    out = []
    for path in sorted(folder.glob("*.yaml")):
        text = path.read_text()
        lead = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            lead.append(line.lstrip("#").strip())
        body = "\n".join("    " + line for line in text.rstrip("\n").splitlines())
        out.append(f"### `{path.stem}`\n\n{' '.join(lead)}\n\n"
                   f"`python -m rlsr_ray.run {path.stem}`; its memory plan: `python -m rlsr_ray.plan {path.stem}`.\n\n"
                   f"??? note \"rlsr_ray/presets/{path.name}\"\n    ```yaml\n{body}\n    ```\n")
    return "\n".join(out)
