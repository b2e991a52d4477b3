"""PCD point files (the format of PCL and Open3D): ``DATA ascii``, ``binary`` and ``binary_compressed``.

A PCD file is a text header, one ``KEY values...`` line each (``#`` starts a comment), ending
with the ``DATA`` line, then the points::

    VERSION 0.7
    FIELDS x y z rgb           names, any order; x, y and z must be among them
    SIZE 4 4 4 4               bytes per value: 1, 2, 4 or 8
    TYPE F F F U               I (signed), U (unsigned) or F (float: size 4 or 8)
    COUNT 1 1 1 1              values per field (optional, default 1)
    WIDTH 213                  points per row (all points for an unorganised cloud)
    HEIGHT 1                   rows (optional, default 1)
    VIEWPOINT 0 0 0 1 0 0 0    sensor pose (optional; not applied, as in PCL)
    POINTS 213                 WIDTH * HEIGHT (optional)
    DATA ascii                 ascii | binary | binary_compressed

``ascii``: one line of values per point. ``binary``: packed little-endian records, one per
point, fields in header order. ``binary_compressed``: two little-endian uint32 (compressed and
uncompressed size), then LZF-compressed bytes that hold each field's values for all points,
field after field. Only ``x``, ``y``, ``z`` are read; every other field is checked and ignored.
"""

from dataclasses import dataclass

import numpy as np

_PCD_TYPES = {("I", 1): "i1", ("I", 2): "i2", ("I", 4): "i4", ("I", 8): "i8",
              ("U", 1): "u1", ("U", 2): "u2", ("U", 4): "u4", ("U", 8): "u8",
              ("F", 4): "f4", ("F", 8): "f8"}  # fmt: skip
_PCD_KEYS = ("VERSION", "FIELDS", "SIZE", "TYPE", "COUNT", "WIDTH", "HEIGHT", "VIEWPOINT", "POINTS", "DATA")
_PCD_DATA = ("ascii", "binary", "binary_compressed")
_AXES = ("x", "y", "z")


@dataclass(frozen=True)
class PcdHeader:
    """The parsed header: fields in file order, the point count, the data format and where the body starts."""

    fields: tuple[str, ...]
    dtypes: tuple[np.dtype, ...]  # little-endian type of one value of each field
    counts: tuple[int, ...]  # values per field
    points: int
    data: str  # one of _PCD_DATA
    body_start: int

    def record_dtype(self) -> np.dtype:
        """One point of a ``binary`` body; fields are named by position since names may repeat (``_``)."""
        return np.dtype([(f"f{i}", t, (c,)) for i, (t, c) in enumerate(zip(self.dtypes, self.counts, strict=True))])

    def axis_index(self, axis: str) -> int:
        """The position of field ``axis`` ("x", "y" or "z"), which must appear once with one value."""
        positions = [i for i, name in enumerate(self.fields) if name == axis]
        if len(positions) != 1:
            found = "missing" if not positions else "listed more than once"
            raise ValueError(f"expected fields x, y, z once each, {axis!r} is {found} in FIELDS {list(self.fields)}")
        if self.counts[positions[0]] != 1:
            raise ValueError(f"field {axis!r} has COUNT {self.counts[positions[0]]}, expected 1")
        return positions[0]


def _ints(key: str, words: list[str]) -> list[int]:
    try:
        return [int(w) for w in words]
    except ValueError:
        raise ValueError(f"PCD {key} expects integers, found {' '.join(words)!r}") from None


def _header_lines(data: bytes) -> tuple[dict[str, list[str]], int]:
    """The header's ``KEY -> values`` up to and including ``DATA``, and the offset of the body."""
    values: dict[str, list[str]] = {}
    pos = 0
    while "DATA" not in values:
        if pos >= len(data):
            raise ValueError("expected a PCD header ending with a 'DATA ascii|binary|binary_compressed' line")
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end
        line = data[pos:end].decode("ascii").split("#", 1)[0].split()
        pos = end + 1
        if not line:
            continue
        key, words = line[0].upper(), line[1:]
        if key not in _PCD_KEYS:
            raise ValueError(f"unexpected PCD header line {' '.join(line)!r}, expected keys {list(_PCD_KEYS)}")
        if key in values:
            raise ValueError(f"PCD header lists {key} twice")
        values[key] = words
    return values, min(pos, len(data))


def parse_pcd_header(data: bytes) -> PcdHeader:
    """Parse and check the header of a PCD file (see the module docstring)."""
    values, body_start = _header_lines(data)
    missing = [k for k in ("FIELDS", "SIZE", "TYPE") if k not in values]
    if missing:
        raise ValueError(f"PCD header has no {', '.join(missing)} line")
    fields = tuple(values["FIELDS"])
    sizes = _ints("SIZE", values["SIZE"])
    types = [t.upper() for t in values["TYPE"]]
    counts = _ints("COUNT", values.get("COUNT", ["1"] * len(fields)))
    for key, listed in (("SIZE", sizes), ("TYPE", types), ("COUNT", counts)):
        if len(listed) != len(fields):
            raise ValueError(f"PCD {key} lists {len(listed)} values for {len(fields)} FIELDS")
    if any(c < 1 for c in counts):
        raise ValueError(f"PCD COUNT values must be >= 1, found {counts}")
    dtypes = []
    for name, kind, size in zip(fields, types, sizes, strict=True):
        if (kind, size) not in _PCD_TYPES:
            raise ValueError(f"field {name!r} has TYPE {kind} SIZE {size}; expected I or U with SIZE 1, 2, 4 "
                             "or 8, or F with SIZE 4 or 8")
        dtypes.append(np.dtype("<" + _PCD_TYPES[kind, size]))
    if len(values["DATA"]) != 1 or values["DATA"][0].lower() not in _PCD_DATA:
        raise ValueError(f"PCD DATA {' '.join(values['DATA'])!r}: expected one of {list(_PCD_DATA)}")
    if "VIEWPOINT" in values and len(values["VIEWPOINT"]) != 7:
        raise ValueError(f"PCD VIEWPOINT expects 7 numbers (tx ty tz qw qx qy qz), found {values['VIEWPOINT']}")
    header = PcdHeader(fields, tuple(dtypes), tuple(counts), _point_count(values), values["DATA"][0].lower(),
                       body_start)
    for axis in _AXES:
        header.axis_index(axis)
    return header


def _point_count(values: dict[str, list[str]]) -> int:
    """POINTS, checked against WIDTH * HEIGHT (either may be missing, not both)."""
    size = {k: _ints(k, values[k]) for k in ("WIDTH", "HEIGHT", "POINTS") if k in values}
    if any(len(v) != 1 or v[0] < 0 for v in size.values()):
        raise ValueError(f"PCD WIDTH, HEIGHT and POINTS expect one integer >= 0 each, found {size}")
    width, height, points = (size[k][0] if k in size else None for k in ("WIDTH", "HEIGHT", "POINTS"))
    if width is None and points is None:
        raise ValueError("PCD header has neither WIDTH nor POINTS")
    organised = None if width is None else width * (1 if height is None else height)
    if points is not None and organised is not None and points != organised:
        raise ValueError(f"PCD POINTS {points} differs from WIDTH * HEIGHT = {organised}")
    return organised if points is None else points


def lzf_decompress(data: bytes, expected_size: int) -> bytes:
    """Decompress an LZF block (liblzf's format) that must give exactly ``expected_size`` bytes.

    The stream is a sequence of runs: a control byte below 32 is followed by ``ctrl + 1`` literal
    bytes; any other is a back-reference of length ``(ctrl >> 5) + 2`` (the 3-bit field 7 means a
    further length byte is added) to ``((ctrl & 31) << 8) + next byte + 1`` bytes before the end of
    the output. A reference may overlap the bytes it produces (a repeated pattern).
    """
    out = bytearray()
    pos, end = 0, len(data)
    while pos < end:
        ctrl = data[pos]
        pos += 1
        if ctrl < 32:
            length = ctrl + 1
            if pos + length > end:
                raise ValueError("LZF data ends inside a literal run")
            out += data[pos:pos + length]
            pos += length
            continue
        length = ctrl >> 5
        if length == 7:
            if pos >= end:
                raise ValueError("LZF data ends inside a back-reference")
            length += data[pos]
            pos += 1
        if pos >= end:
            raise ValueError("LZF data ends inside a back-reference")
        distance = ((ctrl & 31) << 8) + data[pos] + 1
        pos += 1
        length += 2
        if distance > len(out):
            raise ValueError(f"LZF back-reference {distance} bytes back, only {len(out)} bytes decoded")
        start = len(out) - distance
        if distance >= length:
            out += out[start:start + length]
        else:  # overlapping: the pattern of `distance` bytes repeats
            pattern = bytes(out[start:])
            out += (pattern * (length // distance + 1))[:length]
        if len(out) > expected_size:
            break
    if len(out) != expected_size:
        raise ValueError(f"LZF data decompresses to {len(out)} bytes or more, the header says {expected_size}")
    return bytes(out)


def _ascii_xyz(header: PcdHeader, body: bytes) -> np.ndarray:
    """``x, y, z`` (float64) of the text lines of an ``ascii`` body, one line per point."""
    lines = [line.split() for line in body.decode("ascii").splitlines()]
    rows = [words for words in lines if words]
    width = sum(header.counts)
    if len(rows) != header.points:
        raise ValueError(f"expected {header.points} point lines (POINTS), found {len(rows)}")
    bad = next((i for i, words in enumerate(rows) if len(words) != width), None)
    if bad is not None:
        raise ValueError(f"point line {bad + 1} has {len(rows[bad])} values, expected {width} "
                         f"(FIELDS {list(header.fields)} with COUNT {list(header.counts)})")
    starts = np.cumsum((0, *header.counts))
    columns = [starts[header.axis_index(axis)] for axis in _AXES]
    table = np.asarray([[words[c] for c in columns] for words in rows], dtype=np.bytes_).reshape(-1, 3)
    return table.astype(np.float64)


def _binary_xyz(header: PcdHeader, body: bytes) -> np.ndarray:
    """``x, y, z`` (float64) of a ``binary`` body: one packed record per point."""
    record = header.record_dtype()
    needed = record.itemsize * header.points
    if len(body) != needed:
        raise ValueError(f"expected {needed} bytes of binary point data ({header.points} points of "
                         f"{record.itemsize} bytes), found {len(body)}")
    points = np.frombuffer(body, dtype=record, count=header.points)
    return np.stack([points[f"f{header.axis_index(a)}"][:, 0].astype(np.float64) for a in _AXES], axis=1)


def _compressed_xyz(header: PcdHeader, body: bytes) -> np.ndarray:
    """``x, y, z`` (float64) of a ``binary_compressed`` body: LZF-compressed columns, field after field."""
    if len(body) < 8:
        raise ValueError("binary_compressed data ends before its two sizes")
    compressed, size = (int(v) for v in np.frombuffer(body, dtype="<u4", count=2))
    needed = header.record_dtype().itemsize * header.points
    if size != needed:
        raise ValueError(f"binary_compressed data holds {size} bytes, expected {needed} "
                         f"({header.points} points of {header.record_dtype().itemsize} bytes)")
    if len(body) - 8 != compressed:
        raise ValueError(f"binary_compressed data declares {compressed} compressed bytes, found {len(body) - 8}")
    raw = lzf_decompress(body[8:], size)
    widths = [t.itemsize * c * header.points for t, c in zip(header.dtypes, header.counts, strict=True)]
    offsets = np.cumsum((0, *widths))
    columns = []
    for axis in _AXES:
        i = header.axis_index(axis)
        columns.append(np.frombuffer(raw, dtype=header.dtypes[i], count=header.points, offset=int(offsets[i])))
    return np.stack(columns, axis=1).astype(np.float64)


def read_pcd_xyz(data: bytes) -> np.ndarray:
    """The ``x, y, z`` columns (float64 ``[n, 3]``) of a PCD file's bytes; ValueError saying what is wrong."""
    header = parse_pcd_header(data)
    body = data[header.body_start:]
    reader = {"ascii": _ascii_xyz, "binary": _binary_xyz, "binary_compressed": _compressed_xyz}[header.data]
    return reader(header, body)
