"""Files left out of a data set, told in a few lines however many there are.

A check that leaves files out (`simmim scan`, the loaders' checked list, `convert`, `shard`, the
figure preview) names the first `NAMED` of them, one line each, then writes ONE summary line: how
many of how many files were left out, counted by the kind of reason, and where the full list is
(`LIST.bad.txt` beside a scan list, `scan.write_bad_list`): 10,000 truncated JPEGs in an ImageNet
copy are 6 lines, not 10,000.

A reason's kind (`reason_kind`) is its text without what differs file to file (sizes, shapes,
quoted names, byte counts in parentheses), so one cause is one group; a channel mismatch keeps
its channel count (`4 channels, data.channels is 1`). When every file is left out for the same
channel count, the error names the setting that reads them (`no_image_error`): the one fix,
not a generic "nothing decodes".
"""
from __future__ import annotations

import logging
import os
import re
from collections import Counter

from simmim.core.errors import DatasetError

NAMED = 5  # per-file lines before the rest are only counted
KINDS_SHOWN = 4  # reason kinds spelled out in a summary; the rest are counted as "other"

# a file holding another channel count than the run reads: a .npy / TIFF read as an array
# (`channels._channels_last`) or a multi-band TIFF read as RGB or grey (`decode._to_rgb`)
_CHANNELS = re.compile(r"^(?:(\d+) channel\(s\) \(shape|a TIFF of (\d+) bands:)")
_READS = re.compile(r"data\.channels is (\d+)|this run reads (grey|RGB) images")
_LIMIT = re.compile(r"over the limit of (\d+)")


def file_channels(reason: str) -> int | None:
    """The channel count a file holds when `reason` says it differs from data.channels, else None."""
    m = _CHANNELS.match(reason)
    return int(m.group(1) or m.group(2)) if m else None


def reason_kind(reason: str) -> str:
    """The group `reason` (a one-line skip reason of `decode` / `channels`) is counted in: short,
    and the same for every file with the same cause (module docstring)."""
    c = file_channels(reason)
    if c is not None:
        m = _READS.search(reason)
        run = {"grey": "1", "RGB": "3"}.get(m.group(2), m.group(1)) if m else "?"
        return f"{c} channels, data.channels is {run}"
    m = _LIMIT.search(reason)
    if m:
        return f"over the pixel limit of {m.group(1)} (data.max_pixels)"
    kind, inner = reason, re.compile(r"\s*\([^()]*\)")
    while inner.search(kind):  # innermost first: sizes, byte counts, shapes, lists of formats
        kind = inner.sub("", kind)
    kind = re.sub(r"b?'[^']*'|\"[^\"]*\"", "", kind).split(";")[0]  # quoted names; the advice after ';'
    kind = re.sub(r"\s+", " ", kind).strip(" :,")
    return kind[:80] or reason[:80]


def count_kinds(bad: list[tuple[str, str]]) -> str:
    """'b1: kind1; b2: kind2; ...' for (path, reason) pairs, the most frequent kind first."""
    kinds = Counter(reason_kind(r) for _, r in bad).most_common()
    shown = [f"{n}: {k}" for k, n in kinds[:KINDS_SHOWN]]
    if len(kinds) > KINDS_SHOWN:
        shown.append(f"{sum(n for _, n in kinds[KINDS_SHOWN:])}: {len(kinds) - KINDS_SHOWN} other reasons")
    return "; ".join(shown)


def summary(bad: list[tuple[str, str]], total: int, where: str, listed: str | os.PathLike | None = None) -> str:
    """'skipped B of N files of WHERE (b1: kind1; ...)[; every one with its reason: LIST]'."""
    return f"skipped {len(bad)} of {total} files of {where} ({count_kinds(bad)}){_listed_at(listed)}"


def _listed_at(listed) -> str:
    return f"; every one with its reason: {listed}" if listed else ""


def log_skips(log: logging.Logger, who: str, bad: list[tuple[str, str]], total: int, where: str,
              listed: str | os.PathLike | None = None, new: list[tuple[str, str]] | None = None) -> None:
    """Warns of the files left out of `total`: the first `NAMED` of `new` (default: all of `bad`,
    (path, reason) pairs) one line each, then one `summary` line of all of `bad`. Nothing when
    `new` is empty (files a scan record already knew as bad are not told again each run)."""
    new = bad if new is None else new
    if not new:
        return
    for path, reason in new[:NAMED]:
        log.warning("%s: skipping %r (%s)", who, path, reason)
    log.warning("%s: %s", who, summary(bad, total, where, listed))


def no_image_error(where: str, bad: list[tuple[str, str]], total: int, channels: int,
                   setting: str = "data.channels", listed: str | os.PathLike | None = None) -> DatasetError:
    """The one-line error for a data set of which no file reads (`total` files, `bad`: the (path,
    reason) of those left out; the rest are gone). Every file of one channel count C that
    `channels` (data.channels) is not: the fix, named by `setting` ("data.channels" in a run,
    "--channels" for `simmim scan`, "" for a command that reads RGB only: the torch backend run
    that reads them). Else the reasons counted by kind (`count_kinds`) and `listed`, the full list."""
    counts = {file_channels(r) for _, r in bad}
    c = counts.pop() if len(bad) == total and len(counts) == 1 else None
    # 3-channel arrays (.npy) are read by no setting: data.channels=3 reads image files only
    if c is not None and c != channels and not (c == 3 and any(p.lower().endswith(".npy") for p, _ in bad)):
        torch_only = "" if c in (1, 3) else " (data.backend=torch)"
        fix = {"data.channels": f"set data.channels={c}{torch_only}", "--channels": f"pass --channels {c}"}.get(
            setting, f"pre-train on them with data.backend=torch data.channels={c}")
        return DatasetError(f"every file of {where} ({total}) has {c} channels, "
                            f"{f'not {setting}={channels}' if setting else f'this command reads {channels}'}: {fix}")
    gone = f"; {total - len(bad)}: gone or not a regular file" if len(bad) < total else ""
    return DatasetError(f"none of the {total} files of {where} reads ({count_kinds(bad)}{gone}){_listed_at(listed)}")
