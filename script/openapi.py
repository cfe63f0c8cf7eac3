"""Write the OpenAPI schema of a Cog config (cog.yaml or cog.stream.yaml) with the Cog SDK's own
generator (cog 0.16.12, in script/schema's small venv), as `cog build` would make it:

- the generator predates ``cog.streaming``: a no-op stands in while it imports predict.py (as in
  Cog 0.23, where the decorator does nothing at run time);
- `cog build` marks a ``@streaming`` predict with ``x-cog-streaming: true`` on ``POST /predictions``
  (replicate/cog pkg/schema/openapi_spec.go), which coglet reads to answer SSE: added here the same
  way, from the decorator as written in the source.

    python script/openapi.py CONFIG > schema.json     (run in the project folder)
"""

import ast
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def streams(ref: str) -> bool:
    file_name, class_name = ref.split(":")
    tree = ast.parse((ROOT / file_name).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    fn = next(n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "predict")
    names = {d.id if isinstance(d, ast.Name) else getattr(d, "attr", None) for d in fn.decorator_list}
    return "streaming" in names


def main() -> None:
    config_file = ROOT / sys.argv[1]
    config = yaml.safe_load(config_file.read_text())
    with tempfile.TemporaryDirectory() as tmp:  # the generator reads ./cog.yaml
        for name in ("predict.py", "train.py"):
            os.symlink(ROOT / name, Path(tmp) / name)
        shutil.copyfile(config_file, Path(tmp) / "cog.yaml")
        os.chdir(tmp)
        sys.path.insert(0, str(ROOT))
        import cog

        if not hasattr(cog, "streaming"):
            cog.streaming = lambda fn=None: fn if fn is not None else (lambda f: f)
        from cog.command import openapi_schema as generator
        from cog.config import Config
        from cog.server.http import create_app
        from cog.suppress_output import suppress_output

        with suppress_output():
            app = create_app(cog_config=Config(), shutdown_event=None, is_build=True)
        schema = generator.remove_title_next_to_ref(app.openapi())
    if streams(config["predict"]):
        schema["paths"]["/predictions"]["post"]["x-cog-streaming"] = True
    print(json.dumps(schema, indent=2))


if __name__ == "__main__":
    main()
