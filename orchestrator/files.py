"""Reading the user's YAML and JSON files: a missing, binary, oversized or malformed file is one
line naming it, within a second, whatever its content. `--set` values are YAML too and get the
same bounds (`load_yaml`).

A job config, cluster spec, profile or plan is a few kilobytes. What is refused, and why:
- anything but a regular file (a folder, a FIFO or a device would block or never end);
- files over `MAX_FILE_BYTES`;
- bytes that are not UTF-8 text;
- YAML of more than `MAX_VALUES` values or nested deeper than `MAX_DEPTH`, found by counting
  the parser's events (libyaml's, when PyYAML has it) before anything is built: building four
  megabytes of small values takes PyYAML a minute here, counting them stops after a tenth of a second;
- YAML whose aliases expand to more than `MAX_VALUES` values: PyYAML shares an aliased node
  instead of copying it, so a "billion laughs" file loads in microseconds, and then every walk
  over it (overrides, validation, logging) expands it exponentially;
- duplicate keys in one mapping (PyYAML keeps the last one silently; which one the user meant is
  not ours to guess).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import uuid
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from orchestrator.errors import UserError, shown

MAX_FILE_BYTES = 4 * 2**20
MAX_VALUES = 100_000
MAX_DEPTH = 64
_Parser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where PyYAML was built with it


def named(path: str | Path) -> str:
    """A path as an error line names it: whole, or past 120 characters cut, with its length."""
    name = str(path)
    return name if len(name) <= 120 else f"{name[:60]}... ({len(name):,} characters)"


def a_path(path: Any, what: str) -> Path:
    """`path` as a Path, else a UserError: a None, number or bytes given to `Profile.load`, `load_cluster`,
    `save` (Python callers) failed deep inside pathlib with a TypeError."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise UserError(f"{what}: must be a path (a str or pathlib.Path), got {type(path).__name__}")
    return Path(path)


def read_text(path: str | Path, what: str, *, max_bytes: int = MAX_FILE_BYTES,
              own_only: bool = False) -> tuple[Path, str]:
    """The path and UTF-8 text of a regular file of at most `max_bytes`, else a one-line error.

    Checked and read through one descriptor, so the file read is the file checked. `own_only`: a
    cache entry, at a predictable name in a folder others may write (XDG_CACHE_HOME on a shared
    folder), read only when it is this user's own file and no symbolic link: a file another user
    planted there, or a link swapped in, says what a plan or job would take for measured figures.
    """
    path = a_path(path, f"the {what} file")
    with _opened(path, what, own_only=own_only) as file:
        size = os.fstat(file.fileno()).st_size
        if size > max_bytes:
            raise UserError(f"{named(path)}: {size:,} bytes is too large for a {what} file (at most {max_bytes:,})")
        try:
            payload = file.read(max_bytes + 1)
        except OSError as exc:  # an I/O error
            raise UserError(f"{named(path)}: cannot read the {what} file ({exc.strerror or exc})") from None
    if len(payload) > max_bytes:  # grown since
        raise UserError(f"{named(path)}: more than {max_bytes:,} bytes is too large for a {what} file")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{named(path)}: not UTF-8 text (byte {exc.start} is 0x{payload[exc.start]:02x}); "
                        f"is this the {what} file?") from None
    # A UTF-8 byte order mark (Notepad, PowerShell's Out-File): YAML skipped it, but a JSON profile,
    # plan or observations file with one was refused as "not valid JSON (line 1)".
    return path, text.removeprefix("\ufeff")


def _opened(path: Path, what: str, *, own_only: bool) -> BinaryIO:
    """`path` open to read if it is a regular file (and, `own_only`, this user's and no link)."""
    # Non-blocking: a FIFO opens at once, to be refused, instead of waiting for a writer.
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if own_only else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise UserError(f"{named(path)}: {what} file not found") from None
    except ValueError:  # a NUL byte (YAML's "\0"), which no file name holds
        raise UserError(f"{shown(str(path))}: not a {what} file name (it holds a NUL byte)") from None
    except OSError as exc:
        why = "a symbolic link, not a file this program wrote" if exc.errno == errno.ELOOP and own_only else (
            f"cannot read the {what} file ({exc.strerror or exc})")
        raise UserError(f"{named(path)}: {why}") from None
    st = os.fstat(fd)
    why = (f"not a regular file (the {what} must be a file)" if not stat.S_ISREG(st.st_mode)
           else f"owned by another user (uid {st.st_uid})" if own_only and st.st_uid != os.geteuid() else None)
    if why:
        os.close(fd)
        raise UserError(f"{named(path)}: {why}")
    return os.fdopen(fd, "rb")


def write_text(path: str | Path, text: str, *, follow_links: bool = True) -> Path:
    """Write `text` to `path`, its folder made; a place that cannot be written is a one-line error
    naming it. A file is written whole or not at all (staged beside it and renamed over it, its
    mode kept; through a symbolic link to its target, or with `follow_links=False` over the link
    itself), so a full disk leaves the previous file as it was; a device or pipe (`-o /dev/stdout`)
    is written in place."""
    path = a_path(path, "the file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        link = path.is_symlink()
        target = path.resolve() if link and follow_links else path
        # Not without following links: a link swapped in after the look above would be written through.
        if follow_links and target.exists() and not target.is_file():
            target.write_text(text)
            return path
        _replace_with(target, text.encode())
    except OSError as exc:
        raise cannot_write(path, exc) from None
    return path


def _replace_with(path: Path, payload: bytes) -> None:
    staged = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    # created as open(2) creates any new file (0666 less the umask); an existing file's mode is kept
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            # The file's own mode, never a link's target's (a planted link to a file of mode 0666 would
            # have the file written world-writable: anyone could then change what it says). Set on the
            # file as opened: by name, a link swapped in for the staged file would be followed.
            if stat.S_ISREG(mode := _lmode(path)):
                os.fchmod(f.fileno(), stat.S_IMODE(mode))
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def _lmode(path: Path) -> int:
    """The mode of `path` itself (0: nothing there)."""
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return 0


def distinct_outputs(outputs: dict[str, str | Path | None], inputs: dict[str, str | Path | None]) -> None:
    """Refuse, naming both flags, an output that is one of the command's inputs or another output
    (the same file under any spelling or link): writing it would destroy what was read or written.
    '-' is refused too: it is no file name a user means."""
    seen: list[tuple[str, Path]] = [(flag, Path(p)) for flag, p in inputs.items() if p is not None]
    for flag, given in outputs.items():
        if given is None:
            continue
        if str(given) == "-":  # a file named '-' was written, where '-' reads as stdout to most tools
            raise UserError(f"{flag} -: name a file; this command prints its summary on stdout")
        path = Path(given)
        for other, before in seen:
            if _same_file(path, before):
                raise UserError(f"{flag} {path}: the same file as {other}; write it elsewhere")
        seen.append((flag, path))


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:  # a name the OS refuses: the write or read of it says so
        return False


def check_writable(path: str | Path) -> Path:
    """Fail now, in one line, if `path` could not be written later (before long work whose result
    it is to hold); its folder is made, a file that was not there is not left behind."""
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):
            pass
    except OSError as exc:
        raise cannot_write(path, exc) from None
    if not existed:
        path.unlink(missing_ok=True)
    return path


def cannot_write(path: str | Path, exc: OSError) -> UserError:
    """The one-line error for a place `path` that could not be written."""
    blocking = next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)
    why = (f"{blocking} is a file, not a folder" if blocking
           else "it is a folder; name a file" if exc.errno == errno.EISDIR else exc.strerror or exc)
    return UserError(f"{path}: cannot write ({why})")


class _StrictLoader(_Parser):  # type: ignore[misc,valid-type]
    """A safe loader (libyaml's parser where there is one) that refuses duplicate keys in a mapping,
    reads what looks like a date as the text written (a job has no date fields; JSON has no dates),
    and says which value it cannot read (an int past Python's 4,300 digits, a 13th month)."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except ValueError as exc:  # a constructor's own error, without the line it is on
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {str(node.value)[:40]!r} ({str(exc)[:80]})", node.start_mark) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_scalar)
# YAML 1.2 (and JSON) read `1e-4` and `1.25e1` as numbers; PyYAML's 1.1 rules want a dot and a
# signed exponent (`1.0e-4`) and read them as text, which a number field then refuses with no hint why.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


# YAML 1.1's base-60 numbers: `deadline_hours: 1:30` was read as 90 (hours), `--set training.epochs=1:30`
# as 90. YAML 1.2 (and JSON) read them as text, which a number field then refuses, naming it. A
# signed fraction without its leading zero (`-.5`) is a number, as in YAML 1.2 (1.1 read it as text).
_NO_BASE_60 = {
    "tag:yaml.org,2002:int": re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)"
                                        r"|[-+]?0x[0-9a-fA-F_]+)$"),
    "tag:yaml.org,2002:float": re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?"
                                          r"|[-+]?\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
}
_BASE_60 = {id(r) for rs in yaml.SafeLoader.yaml_implicit_resolvers.values() for tag, r in rs if tag in _NO_BASE_60}
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, _NO_BASE_60[tag] if id(r) in _BASE_60 else r) for tag, r in resolvers]
    for first, resolvers in _StrictLoader.yaml_implicit_resolvers.items()
}


def _refuse_tag(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    """Sets and bytes: values no job, profile or plan holds, and JSON (MLflow params, job.json) cannot."""
    raise yaml.constructor.ConstructorError(None, None, f"tag {node.tag.replace('tag:yaml.org,2002:', '!!')} "
                                            "is not allowed", node.start_mark)


for _tag in ("set", "binary"):
    _StrictLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse_tag)


def _expanded_values(data: Any, limit: int) -> int:
    """How many values `data` holds with every shared (aliased) node counted each time it is
    used; stops counting past `limit`. Memoized per node, so it costs one pass over the file."""
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        known = sizes.get(id(node))
        if known is not None:
            return known
        # a node met again while it is still being counted holds itself (`a: &a [*a]`): it expands forever
        sizes[id(node)] = limit + 1
        children = list(node.items()) if isinstance(node, dict) else [(None, v) for v in node]
        total = 1
        for key, value in children:
            total += size(value) + (0 if key is None else 1)
            if total > limit:
                break
        sizes[id(node)] = total = min(total, limit + 1)
        return total

    return size(data)


def _check_shape(text: str, path: Path | str, what: str) -> None:
    """Count the parser's events (every scalar, alias and collection start is one value) and the
    nesting, stopping at the first limit passed: nothing is built yet, so this is fast for any file."""
    values = depth = 0
    for event in yaml.parse(text, Loader=_Parser):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise UserError(f"{path}: nested too deeply to be a {what} file (more than {MAX_DEPTH} levels)")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        if isinstance(event, (yaml.CollectionStartEvent, yaml.ScalarEvent, yaml.AliasEvent)):
            values += 1
            if values > MAX_VALUES:
                raise UserError(f"{path}: more than {MAX_VALUES:,} values; a {what} file is far smaller")


def load_yaml(text: str, where: Path | str, what: str) -> Any:
    """YAML text loaded with a safe loader, its size, depth and alias expansion bounded as a file's
    are (UserError naming `where`); a syntax error stays a `yaml.YAMLError` for the caller."""
    _check_shape(text, where, what)
    data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    if _expanded_values(data, MAX_VALUES) > MAX_VALUES:
        raise UserError(f"{where}: expands to more than {MAX_VALUES:,} values (nested YAML aliases?); "
                        f"a {what} file is far smaller")
    return data


def read_yaml(path: str | Path, what: str, *, own_only: bool = False) -> Any:
    """The data of a YAML file (None when it is empty), loaded with a safe loader (`own_only`: `read_text`'s)."""
    path, text = read_text(path, what, own_only=own_only)
    try:
        return load_yaml(text, path, what)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or ""
        if "nesting depth" in problem:  # libyaml's own limit (1,000 levels)
            raise UserError(f"{path}: nested too deeply to be a {what} file (more than {MAX_DEPTH} levels)") from None
        detail = f": {problem}" if problem.startswith(("duplicate key", "cannot read", "tag ")) else ""
        if tag := re.search(r"constructor for the tag '([^']*)'", problem):  # !!python/object...: data only
            detail = f": tag {tag[1].replace('tag:yaml.org,2002:', '!!')} is not allowed"
        raise UserError(f"{path}: not valid YAML{where}{detail}") from None


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: a key given twice is an error, as in YAML (json keeps the last)."""
    data = dict(pairs)
    if len(data) < len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {twice!r}")
    return data


def read_json(path: str | Path, what: str) -> Any:
    path, text = read_text(path, what)
    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno})") from None
    except ValueError as exc:  # an integer past Python's 4,300 digits
        raise UserError(f"{path}: not valid JSON ({str(exc)[:80]})") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a {what} file") from None


def user_cache_dir(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/orchestrator/...``, else ``~/.cache/orchestrator/...``: this user's, local."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache, "orchestrator", *parts)


def open_no_follow(path: Path, flags: int, *, mode: int) -> int:
    """A file descriptor of `path`, created with `mode` (less the umask) if missing, never through a
    symbolic link (ELOOP where one stands): a link planted in a shared folder at a name this program
    writes would have it write to the link's target."""
    return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
