"""A strict reader of Prometheus' text exposition format (0.0.4), for the /metrics tests: it
refuses what a Prometheus server would refuse, and more (the house's own rules: every sample's
family has a HELP and a TYPE, given before its samples; counters end in _total; histograms have
cumulative buckets that end at +Inf and agree with _count).

    families = parse(text)  # {name: Family(kind, help, samples=[(name, {label: value}, float)])}
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
KINDS = {"counter", "gauge", "histogram", "summary", "untyped"}


class FormatError(ValueError):
    pass


@dataclass
class Family:
    kind: str = ""
    help: str | None = None
    samples: list = field(default_factory=list)

    def value(self, suffix: str = "", **labels) -> float | None:
        """The one sample with exactly these labels (and this suffix), None if there is none."""
        found = [v for n, l, v in self.samples if l == labels and n.endswith(suffix) and
                 (suffix or not n.endswith(("_bucket", "_sum", "_count")))]
        assert len(found) <= 1, (labels, found)
        return found[0] if found else None

    def buckets(self, **labels) -> list[tuple[float, float]]:
        return [(float(l["le"]), v) for n, l, v in self.samples
                if n.endswith("_bucket") and {k: x for k, x in l.items() if k != "le"} == labels]


def _labels(text: str, line_no: int) -> tuple[dict, str]:
    """Parses ``{a="x",b="y"}`` at the start of ``text``; returns the labels and the rest."""
    labels, i = {}, 1
    while True:
        if text[i:i + 1] == "}":
            return labels, text[i + 1:]
        m = LABEL.match(text, i)
        if not m or text[m.end():m.end() + 2] != '="':
            raise FormatError(f"line {line_no}: bad label at {text[i:i + 20]!r}")
        name, i = m.group(0), m.end() + 2
        value = []
        while True:
            c = text[i:i + 1]
            if c == "":
                raise FormatError(f"line {line_no}: unterminated label value")
            if c == "\\":
                nxt = text[i + 1:i + 2]
                if nxt not in ('\\', '"', "n"):
                    raise FormatError(f"line {line_no}: bad escape \\{nxt}")
                value.append("\n" if nxt == "n" else nxt)
                i += 2
            elif c == '"':
                i += 1
                break
            elif c == "\n":
                raise FormatError(f"line {line_no}: raw newline in a label value")
            else:
                value.append(c)
                i += 1
        if name in labels:
            raise FormatError(f"line {line_no}: label {name} twice")
        labels[name] = "".join(value)
        if text[i:i + 1] == ",":
            i += 1
        elif text[i:i + 1] != "}":
            raise FormatError(f"line {line_no}: expected , or }} after a label")


def _value(text: str, line_no: int) -> float:
    if text in ("+Inf", "Inf"):
        return math.inf
    if text == "-Inf":
        return -math.inf
    if text == "NaN":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise FormatError(f"line {line_no}: bad value {text!r}") from None


def _family_of(name: str, families: dict) -> str | None:
    if name in families:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)] if name.endswith(suffix) else None
        if base and families.get(base) and families[base].kind in ("histogram", "summary"):
            return base
    return None


def parse(text: str) -> dict[str, Family]:
    if text and not text.endswith("\n"):
        raise FormatError("the text must end with a newline")
    families: dict[str, Family] = {}
    seen: set = set()
    done: set = set()  # families whose samples are over: another sample for them later is an error
    current = None
    for no, line in enumerate(text.split("\n")[:-1], 1):
        if line == "":
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not NAME.fullmatch(name):
                    raise FormatError(f"line {no}: bad metric name {name!r}")
                fam = families.setdefault(name, Family())
                if fam.samples:
                    raise FormatError(f"line {no}: {parts[1]} for {name} after its samples")
                if parts[1] == "TYPE":
                    if fam.kind or len(parts) != 4 or parts[3] not in KINDS:
                        raise FormatError(f"line {no}: bad or second TYPE for {name}")
                    fam.kind = parts[3]
                else:
                    if fam.help is not None:
                        raise FormatError(f"line {no}: second HELP for {name}")
                    fam.help = parts[3] if len(parts) == 4 else ""
                if current is not None and current != name:
                    done.add(current)
                current = name
            continue
        m = NAME.match(line)
        if not m:
            raise FormatError(f"line {no}: bad sample {line!r}")
        name, rest = m.group(0), line[m.end():]
        labels = {}
        if rest.startswith("{"):
            labels, rest = _labels(rest, no)
        if not rest.startswith(" "):
            raise FormatError(f"line {no}: no space before the value")
        fields = rest[1:].split(" ")
        if len(fields) not in (1, 2):
            raise FormatError(f"line {no}: bad value or timestamp {rest!r}")
        value = _value(fields[0], no)
        base = _family_of(name, families)
        if base is None or not families[base].kind or families[base].help is None:
            raise FormatError(f"line {no}: sample {name} without its HELP and TYPE first")
        if base in done:
            raise FormatError(f"line {no}: {name}'s samples are not together")
        if current != base:
            if current is not None:
                done.add(current)
            current = base
        key = (name, tuple(sorted(labels.items())))
        if key in seen:
            raise FormatError(f"line {no}: {name}{labels} twice")
        seen.add(key)
        families[base].samples.append((name, labels, value))
    for name, fam in families.items():
        _check_family(name, fam)
    return families


def _check_family(name: str, fam: Family) -> None:
    if fam.kind == "counter":
        if not name.endswith("_total"):
            raise FormatError(f"counter {name} does not end in _total")
        if any(v < 0 or math.isnan(v) for _, _, v in fam.samples):
            raise FormatError(f"counter {name} below 0")
    if fam.kind != "histogram":
        if any(n != name for n, _, _ in fam.samples):
            raise FormatError(f"{name}: a sample of another name")
        return
    series: dict = {}
    for n, labels, v in fam.samples:
        if n not in (name + "_bucket", name + "_sum", name + "_count"):
            raise FormatError(f"{name}: sample {n} is not a histogram's")
        rest = tuple(sorted((k, x) for k, x in labels.items() if k != "le"))
        s = series.setdefault(rest, {"buckets": [], "sum": None, "count": None})
        if n.endswith("_bucket"):
            if "le" not in labels:
                raise FormatError(f"{name}: a bucket without le")
            s["buckets"].append((_value(labels["le"], 0), v))
        elif "le" in labels:
            raise FormatError(f"{name}: le on {n}")
        else:
            s["sum" if n.endswith("_sum") else "count"] = v
    for rest, s in series.items():
        b = s["buckets"]
        if not b or b[-1][0] != math.inf:
            raise FormatError(f"{name}{dict(rest)}: the buckets do not end at +Inf")
        if [le for le, _ in b] != sorted({le for le, _ in b}):
            raise FormatError(f"{name}{dict(rest)}: le not ascending")
        if any(b[i][1] > b[i + 1][1] for i in range(len(b) - 1)):
            raise FormatError(f"{name}{dict(rest)}: buckets not cumulative")
        if s["count"] is None or s["sum"] is None or s["count"] != b[-1][1]:
            raise FormatError(f"{name}{dict(rest)}: _count missing or not the +Inf bucket")
