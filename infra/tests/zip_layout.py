"""Checks that a packaged Functions app zip matches host.json and functions/.

    python3 infra/tests/zip_layout.py dist/lakeguard-app.zip

The layout the Functions host loads (custom handler): host.json at the zip root, the executable
named by `customHandler.description.defaultExecutablePath` at the root with its executable bit
recorded, and one folder per function holding its function.json. Standard library only, so the
packaging test can call it without the infra venv.
"""

from __future__ import annotations

import json
import pathlib
import stat
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[2]


def expected_functions(root: pathlib.Path = ROOT) -> set[str]:
    return {p.parent.name for p in (root / "functions").glob("*/function.json")}


def check_zip(zip_path, root: pathlib.Path = ROOT) -> list[str]:
    """Problems with the zip at `zip_path` (empty list: the layout is right)."""
    problems: list[str] = []
    try:
        zf = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as e:
        return [f"{zip_path}: not a readable zip: {e}"]
    with zf:
        infos = {i.filename: i for i in zf.infolist()}
        if "host.json" not in infos:
            return [f"{zip_path}: no host.json at the zip root (found: {sorted(infos)[:10]})"]
        try:
            host = json.loads(zf.read("host.json"))
        except ValueError as e:
            return [f"{zip_path}: host.json is not JSON: {e}"]
        repo_host = json.loads((root / "host.json").read_text())
        if host != repo_host:
            problems.append("host.json in the zip differs from the repository's host.json")
        desc = host.get("customHandler", {}).get("description", {})
        exe = desc.get("defaultExecutablePath")
        if not exe:
            problems.append("host.json has no customHandler.description.defaultExecutablePath")
        elif exe not in infos:
            problems.append(f"defaultExecutablePath `{exe}` is not at the zip root")
        else:
            info = infos[exe]
            mode = (info.external_attr >> 16) & 0xFFFF
            if info.create_system != 3 or not stat.S_ISREG(mode):
                problems.append(
                    f"`{exe}` carries no Unix file mode (zip written without it: the host may not run it)"
                )
            elif not mode & 0o111:
                problems.append(f"`{exe}` has no executable bit in the zip (mode {oct(mode)})")
            head = zf.read(exe)[:4]
            if head != b"\x7fELF":
                problems.append(f"`{exe}` is not an ELF executable (starts with {head!r})")
        wanted = expected_functions(root)
        found = {
            name.split("/")[0]
            for name in infos
            if name.count("/") == 1 and name.endswith("/function.json")
        }
        for fn in sorted(wanted - found):
            problems.append(f"function `{fn}`: no {fn}/function.json at the zip root")
        for fn in sorted(found - wanted):
            problems.append(f"`{fn}/function.json` in the zip is not a function of functions/")
        for fn in sorted(wanted & found):
            repo = json.loads((root / "functions" / fn / "function.json").read_text())
            if json.loads(zf.read(f"{fn}/function.json")) != repo:
                problems.append(f"{fn}/function.json in the zip differs from functions/{fn}/function.json")
        deeper = [n for n in infos if n.endswith("function.json") and n.count("/") != 1]
        for n in deeper:
            problems.append(f"`{n}`: a function.json not directly under a function folder")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    problems = check_zip(argv[1])
    for p in problems:
        print(f"zip layout: {p}", file=sys.stderr)
    if not problems:
        print(f"zip layout: {argv[1]} matches host.json and functions/ ({len(expected_functions())} functions)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
