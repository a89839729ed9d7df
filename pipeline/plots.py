"""Plots that render anywhere: the HTML template `dvc plots show` fills (.dvc/config plots.html_template), with
Vega, Vega-Lite and Vega-Embed inlined from vl-convert's bundle instead of DVC's CDN scripts, so the page draws
offline. `make setup` writes it; `write_template` writes it again when the pinned vl-convert changes."""

from pathlib import Path

from pipeline.paths import project_root

TEMPLATE = Path(".dvc/plots_template.html")  # .dvc/config: plots.html_template = plots_template.html

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <script>
BUNDLE
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def write_template(root: Path | None = None) -> Path:
    """The offline template under root (default: this checkout); returns its path."""
    import vl_convert

    path = (root or project_root()) / TEMPLATE
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(PAGE.replace("BUNDLE", vl_convert.javascript_bundle()), encoding="utf-8")
    temporary.replace(path)
    return path


if __name__ == "__main__":
    print(write_template())
