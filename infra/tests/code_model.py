"""What the Rust code reads and writes, extracted from its source for the deployment checks.

The extraction is deliberately strict: when the source no longer has the shapes it looks for, it
raises `CodeShapeChanged` with what it missed, so a refactor of `src/settings.rs` fails these
checks loudly instead of silently checking nothing.
"""

from __future__ import annotations

import pathlib
import re
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parents[2]


class CodeShapeChanged(AssertionError):
    pass


@dataclass
class NumberSetting:
    name: str
    default: int
    min: int
    max: int


@dataclass
class SettingsModel:
    connections: dict[str, str]  # const name -> setting name (SOURCE -> SourceStorage)
    numbers: dict[str, NumberSetting]
    booleans: set[str]
    lists: set[str]
    # Settings matched against string literals: name -> accepted values (lower case when the
    # code lower-cases the value first). Absent value (None arm) always accepted.
    enums: dict[str, set[str]]
    case_insensitive: set[str]
    # Every name read through get(...), number(...), boolean(...), list(...).
    all_names: set[str] = field(default_factory=set)
    datafactory_together: set[str] = field(default_factory=set)


_INT = re.compile(r"^[\d\s*<+()]+$")


def _int_expr(text: str) -> int:
    text = text.strip()
    if not _INT.match(text):
        raise CodeShapeChanged(f"src/settings.rs: cannot read the integer `{text}`")
    return int(eval(text, {"__builtins__": {}}, {}))  # digits and * << + ( ) only


def read_settings(root: pathlib.Path = ROOT) -> SettingsModel:
    path = root / "src" / "settings.rs"
    src = path.read_text()
    start = src.find("pub fn from_map(")
    if start < 0:
        raise CodeShapeChanged("src/settings.rs: no `pub fn from_map(`: Settings::from_env changed")
    end = src.find("\nfn number(", start)
    body = src[start:end if end > 0 else len(src)]

    consts = dict(re.findall(r'pub const (\w+): &str = "([^"]+)";', src))
    connections = {}
    for const in re.findall(r"Connection::from_settings\((\w+), vars\)", body):
        if const not in consts:
            raise CodeShapeChanged(f"src/settings.rs: connection constant {const} not found")
        connections[const] = consts[const]

    numbers = {}
    for m in re.finditer(
        r'number\(\s*vars,\s*"(\w+)",\s*([^,]+?),\s*([^,]+?),\s*([^)]+?),?\s*\)', body
    ):
        name = m.group(1)
        numbers[name] = NumberSetting(name, _int_expr(m.group(2)), _int_expr(m.group(3)), _int_expr(m.group(4)))
    booleans = set(re.findall(r'boolean\(vars, "(\w+)"\)', body))
    lists = set(re.findall(r'list\("(\w+)"\)', body))
    gets = set(re.findall(r'get\("(\w+)"\)', body))

    enums: dict[str, set[str]] = {}
    case_insensitive: set[str] = set()
    # `match get("X") ... { None | Some("a") => .., Some("b") => .., Some(other) => error }`
    for m in re.finditer(r'match get\("(\w+)"\)((?:(?!match |\blet ).)*?)Some\(other\)', body, re.S):
        name, block = m.group(1), m.group(2)
        values = set(re.findall(r'Some\("([^"]*)"\)', block))
        if not values:
            raise CodeShapeChanged(f"src/settings.rs: no accepted values found for {name}")
        enums[name] = values
        if "to_ascii_lowercase" in block.split("{", 1)[0]:
            case_insensitive.add(name)
    df = {n for n in gets if n.startswith("LAKEGUARD_DATAFACTORY_") and n != "LAKEGUARD_DATAFACTORY_PIPELINE"}

    model = SettingsModel(
        connections=connections,
        numbers=numbers,
        booleans=booleans,
        lists=lists,
        enums=enums,
        case_insensitive=case_insensitive,
        all_names=gets | set(numbers) | booleans | lists,
        datafactory_together=df,
    )
    # Shapes the checks rely on; each is a setting the deployment must get right.
    expected = {
        "connections": {"SOURCE", "BACKUP", "JOBS"} <= set(connections),
        "numbers": {"LAKEGUARD_CONCURRENCY", "LAKEGUARD_MAX_DEQUEUE_COUNT", "LAKEGUARD_PENDING_TTL_SECS"} <= set(numbers),
        "enums": {"LAKEGUARD_COPY_ENGINE", "LAKEGUARD_NAME_ORDER"} <= set(enums),
        "queues": {"LAKEGUARD_BACKUP_QUEUE", "LAKEGUARD_RECONCILE_QUEUE"} <= gets,
        "datafactory": len(df) == 3,
        "count": len(model.all_names) >= 25,
    }
    missing = [k for k, ok in expected.items() if not ok]
    if missing:
        raise CodeShapeChanged(
            f"src/settings.rs no longer has the shapes infra/tests read ({missing}): "
            f"found connections={connections}, numbers={sorted(numbers)}, enums={sorted(enums)}, "
            f"{len(model.all_names)} names; update infra/tests/code_model.py"
        )
    return model


def state_container(root: pathlib.Path = ROOT) -> str:
    src = (root / "src" / "settings.rs").read_text()
    m = re.search(r'pub const STATE_CONTAINER: &str = "([^"]+)";', src)
    if not m:
        raise CodeShapeChanged("src/settings.rs: STATE_CONTAINER not found")
    return m.group(1)


def bookkeeping_prefixes(root: pathlib.Path = ROOT) -> dict[str, str]:
    """The state-container prefixes of the records that may expire, from the code that names them."""
    out = {}
    for rel, pattern, what in [
        ("src/ops/state.rs", r'format!\("(requests/)\{id\}\.json"\)', "request batch records"),
        ("src/ops/snapshot/run_state.rs", r'format!\("(producer-runs/)\{run_id\}\.json"\)', "producer run records"),
    ]:
        m = re.search(pattern, (root / rel).read_text())
        if not m:
            raise CodeShapeChanged(f"{rel}: the blob name of the {what} changed; update infra/tests")
        out[what] = m.group(1)
    return out


def backup_delete_calls(root: pathlib.Path = ROOT) -> list[tuple[str, int, str]]:
    """Calls that delete through the backup store (`….backup.delete…(`), as (file, line, text)."""
    out = []
    pat = re.compile(r"\bbackup\s*\.\s*(delete\w*)\s*\(")
    for path in sorted((root / "src").rglob("*.rs")):
        text = path.read_text()
        # Unit tests of a module may do anything.
        code = text.split("#[cfg(test)]", 1)[0]
        for i, line in enumerate(code.splitlines(), 1):
            if pat.search(line):
                out.append((str(path.relative_to(root)), i, line.strip()))
    # Calls split over lines (`app\n    .backup\n    .delete(`).
    for path in sorted((root / "src").rglob("*.rs")):
        code = path.read_text().split("#[cfg(test)]", 1)[0]
        for m in re.finditer(r"\.backup\s*\n\s*\.(delete\w*)\s*\(", code):
            line = code[: m.start()].count("\n") + 1
            out.append((str(path.relative_to(root)), line, m.group(0).strip()))
    return out
