"""Readers for the geometry files users have on disk: PLY, OFF, OBJ, PCD, ``.npy`` and text points.

Each ``parse_*`` function takes the raw file bytes and returns a :class:`Mesh` (float64
vertices ``[V, 3]``, int64 triangles ``[F, 3]``; ``F == 0`` for a point file), raising
``ValueError`` with what was wrong. :func:`read_geometry` reads a path, dispatches on its
suffix and turns every failure into a :class:`DatasetError` that names the file.
"""

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DatasetError
from .pcd import read_pcd_xyz
from .surface import Mesh

# ---------------------------------------------------------------------------------------------
# Shared helpers


def fan_triangulate(polygons: list[list[int]]) -> np.ndarray:
    """Split every polygon ``[v0, v1, ..., vk]`` into the fan ``(v0, vi, vi+1)``: int64 [F, 3]."""
    triangles = []
    for polygon in polygons:
        if len(polygon) < 3:
            raise ValueError(f"face with {len(polygon)} vertices, expected at least 3")
        triangles.extend((polygon[0], polygon[i], polygon[i + 1]) for i in range(1, len(polygon) - 1))
    return np.asarray(triangles, dtype=np.int64).reshape(-1, 3)


def _mesh(vertices: np.ndarray, faces: np.ndarray) -> Mesh:
    """Validate coordinates and face indices, then build the Mesh."""
    vertices = np.asarray(vertices, dtype=np.float64)
    if len(vertices) == 0:
        raise ValueError("no vertices or points")
    finite = np.isfinite(vertices).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"non-finite (nan or inf) coordinates in {len(bad)} of {len(vertices)} points "
                         f"(the first at row {bad[0]})")
    if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError(
            f"face index out of range: found {faces.min()}..{faces.max()}, "
            f"expected 0..{len(vertices) - 1} for {len(vertices)} vertices"
        )
    return Mesh(vertices, faces)


def _no_faces() -> np.ndarray:
    return np.zeros((0, 3), dtype=np.int64)


def _points_from_table(table: np.ndarray) -> Mesh:
    """A point set from an ``[n, >=3]`` table of integers or reals; columns past xyz are ignored."""
    if table.ndim != 2 or table.shape[1] < 3:
        raise ValueError(f"expected an array of shape [n, >=3], found shape {list(table.shape)}")
    if table.dtype.kind not in "iuf":
        raise ValueError(f"expected integer or real numbers, found dtype {table.dtype}")
    return _mesh(table[:, :3], _no_faces())


# ---------------------------------------------------------------------------------------------
# PLY (ascii, binary_little_endian, binary_big_endian)

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip
_PLY_FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}
_FACE_INDEX_NAMES = ("vertex_indices", "vertex_index")


@dataclass(frozen=True)
class _PlyProperty:
    name: str
    dtype: str  # numpy type code of the value (of each item, for a list)
    count_dtype: str | None = None  # numpy type code of the list length; None for a scalar


@dataclass(frozen=True)
class _PlyElement:
    name: str
    count: int
    properties: tuple[_PlyProperty, ...]


def _ply_type(name: str) -> str:
    if name not in _PLY_TYPES:
        raise ValueError(f"unknown PLY property type {name!r}")
    return _PLY_TYPES[name]


def _parse_ply_header(data: bytes) -> tuple[str, list[_PlyElement], int]:
    """Return (format, elements in file order, offset of the first body byte)."""
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise ValueError("expected a PLY header starting with 'ply' and ending with 'end_header'")
    body_start = data.index(b"\n", end) + 1 if b"\n" in data[end:] else len(data)
    fmt = None
    elements: list[tuple[str, int, list[_PlyProperty]]] = []
    for line in data[:end].decode("ascii").splitlines()[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            if len(words) < 2 or words[1] not in _PLY_FORMATS:
                raise ValueError(f"unsupported PLY format line {line!r}")
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3:
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements and len(words) >= 3:
            if words[1] == "list" and len(words) == 5:
                prop = _PlyProperty(words[4], _ply_type(words[3]), _ply_type(words[2]))
            elif len(words) == 3:
                prop = _PlyProperty(words[2], _ply_type(words[1]))
            else:
                raise ValueError(f"malformed PLY property line {line!r}")
            elements[-1][2].append(prop)
        else:
            raise ValueError(f"unexpected PLY header line {line!r}")
    if fmt is None:
        raise ValueError("PLY header has no 'format' line")
    return fmt, [_PlyElement(n, c, tuple(p)) for n, c, p in elements], body_start


class _AsciiPlyBody:
    """Reads elements one after another from whitespace-separated tokens."""

    def __init__(self, body: bytes):
        self.tokens = body.split()
        self.pos = 0

    def _take(self, count: int, element: _PlyElement) -> list[bytes]:
        if self.pos + count > len(self.tokens):
            raise ValueError(f"file ends inside PLY element {element.name!r}")
        taken = self.tokens[self.pos : self.pos + count]
        self.pos += count
        return taken

    def read(self, element: _PlyElement) -> dict[str, np.ndarray | list[list[int]]]:
        props = element.properties
        if all(p.count_dtype is None for p in props):
            flat = self._take(element.count * len(props), element)
            table = np.asarray(flat, dtype=np.bytes_).astype(np.float64)
            table = table.reshape(element.count, len(props))
            return {p.name: table[:, i] for i, p in enumerate(props)}
        columns: dict[str, list] = {p.name: [] for p in props}
        for _ in range(element.count):
            for p in props:
                if p.count_dtype is None:
                    columns[p.name].append(float(self._take(1, element)[0]))
                else:
                    length = int(self._take(1, element)[0])
                    columns[p.name].append([int(t) for t in self._take(length, element)])
        return columns


class _BinaryPlyBody:
    """Reads elements one after another from packed binary records of one byte order."""

    def __init__(self, body: bytes, byte_order: str):
        self.body = body
        self.order = byte_order
        self.offset = 0

    def _array(self, dtype: np.dtype, count: int, element: _PlyElement) -> np.ndarray:
        if self.offset + dtype.itemsize * count > len(self.body):
            raise ValueError(f"file ends inside PLY element {element.name!r}")
        values = np.frombuffer(self.body, dtype=dtype, count=count, offset=self.offset)
        self.offset += dtype.itemsize * count
        return values

    def _record_dtype(self, element: _PlyElement, lengths: dict[str, int]) -> np.dtype:
        fields = []
        for p in element.properties:
            if p.count_dtype is None:
                fields.append((p.name, self.order + p.dtype))
            else:
                fields.append((p.name + "#len", self.order + p.count_dtype))
                fields.append((p.name, self.order + p.dtype, (lengths[p.name],)))
        return np.dtype(fields)

    def _first_list_lengths(self, element: _PlyElement) -> dict[str, int]:
        """Decode the first record only to learn the length of each of its lists."""
        lengths, offset = {}, self.offset
        for p in element.properties:
            size = np.dtype(p.dtype).itemsize
            if p.count_dtype is not None:
                count_type = np.dtype(self.order + p.count_dtype)
                if offset + count_type.itemsize > len(self.body):
                    raise ValueError(f"file ends inside PLY element {element.name!r}")
                lengths[p.name] = int(np.frombuffer(self.body, count_type, 1, offset)[0])
                offset += count_type.itemsize
                size *= lengths[p.name]
            offset += size
        return lengths

    def read(self, element: _PlyElement) -> dict[str, np.ndarray | list[list[int]]]:
        if element.count == 0:
            return {p.name: [] for p in element.properties}
        lengths = self._first_list_lengths(element)
        # Fast path: every list has the length of the first record's (e.g. all triangles).
        record = self._record_dtype(element, lengths)
        end = self.offset + record.itemsize * element.count
        if end <= len(self.body):
            records = np.frombuffer(self.body, dtype=record, count=element.count, offset=self.offset)
            if all((records[name + "#len"] == length).all() for name, length in lengths.items()):
                self.offset = end
                return {p.name: records[p.name] for p in element.properties}
        return self._read_variable(element)

    def _read_variable(self, element: _PlyElement) -> dict[str, list]:
        columns: dict[str, list] = {p.name: [] for p in element.properties}
        for _ in range(element.count):
            for p in element.properties:
                if p.count_dtype is None:
                    value = self._array(np.dtype(self.order + p.dtype), 1, element)[0]
                    columns[p.name].append(value)
                else:
                    (length,) = self._array(np.dtype(self.order + p.count_dtype), 1, element)
                    items = self._array(np.dtype(self.order + p.dtype), int(length), element)
                    columns[p.name].append(items.tolist())
        return columns


def parse_ply(data: bytes) -> Mesh:
    """Parse an ascii or binary PLY file: vertex ``x, y, z`` plus an optional face list."""
    fmt, elements, body_start = _parse_ply_header(data)
    byte_order = _PLY_FORMATS[fmt]
    body = data[body_start:]
    reader = _AsciiPlyBody(body) if byte_order is None else _BinaryPlyBody(body, byte_order)
    vertices, faces = None, _no_faces()
    for element in elements:
        columns = reader.read(element)
        if element.name == "vertex":
            scalar = {p.name for p in element.properties if p.count_dtype is None}
            if not {"x", "y", "z"} <= scalar:
                found = [p.name for p in element.properties]
                raise ValueError(f"expected vertex properties x, y, z, found {found}")
            vertices = np.stack([np.asarray(columns[a], np.float64) for a in "xyz"], axis=1)
        elif element.name == "face":
            names = [n for n in _FACE_INDEX_NAMES if n in columns]
            if not names:
                found = [p.name for p in element.properties]
                raise ValueError(f"expected face property 'vertex_indices', found {found}")
            indices = columns[names[0]]
            if isinstance(indices, np.ndarray) and indices.shape[1:] == (3,):
                faces = indices.astype(np.int64)
            else:
                faces = fan_triangulate([list(map(int, polygon)) for polygon in indices])
        if vertices is not None and element.name == "face":
            break  # later elements (edges, materials) are not needed
    if vertices is None:
        raise ValueError("PLY file has no 'vertex' element")
    return _mesh(vertices, faces)


# ---------------------------------------------------------------------------------------------
# OFF and OBJ


def _content_lines(data: bytes) -> list[list[str]]:
    """Non-empty lines split into words, with ``#`` comments removed."""
    lines = (line.split("#", 1)[0].split() for line in data.decode("utf-8").splitlines())
    return [words for words in lines if words]


def parse_off(data: bytes) -> Mesh:
    """Parse an OFF mesh, including the common malformed first line ``OFF123 456 0``."""
    lines = _content_lines(data)
    if not lines or not lines[0][0].startswith("OFF"):
        raise ValueError("expected the first line to start with 'OFF'")
    glued = lines[0][0][3:]  # "OFF123" carries the vertex count in the keyword itself
    counts = ([glued] if glued else []) + lines[0][1:]
    body = lines[1:]
    if not counts:
        counts, body = body[0] if body else [], body[1:]
    if len(counts) < 2:
        raise ValueError(f"expected counts 'vertices faces [edges]' after 'OFF', found {counts}")
    num_vertices, num_faces = int(counts[0]), int(counts[1])
    if len(body) < num_vertices + num_faces:
        raise ValueError(f"expected {num_vertices} vertex and {num_faces} face lines, found {len(body)} lines")
    vertex_rows = body[:num_vertices]
    if any(len(row) < 3 for row in vertex_rows):
        raise ValueError("expected every vertex line to have 3 coordinates")
    vertices = np.asarray([row[:3] for row in vertex_rows], dtype=np.float64).reshape(-1, 3)
    polygons = []
    for row in body[num_vertices : num_vertices + num_faces]:
        length = int(row[0])
        if len(row) < length + 1:
            raise ValueError(f"face line {' '.join(row)!r} lists fewer than {length} indices")
        polygons.append([int(i) for i in row[1 : length + 1]])
    return _mesh(vertices, fan_triangulate(polygons))


def _obj_index(word: str, num_vertices: int) -> int:
    """A 0-based vertex index from an OBJ face word ``v``, ``v/vt``, ``v//vn`` or ``v/vt/vn``."""
    index = int(word.split("/", 1)[0])
    if index == 0:
        raise ValueError("OBJ face index 0 (indices start at 1)")
    return index - 1 if index > 0 else num_vertices + index  # negative: relative to the end


def parse_obj(data: bytes) -> Mesh:
    """Parse the ``v`` and ``f`` lines of a Wavefront OBJ file; polygons become triangle fans."""
    vertices: list[list[str]] = []
    polygons: list[list[int]] = []
    for words in _content_lines(data):
        if words[0] == "v":
            if len(words) < 4:
                raise ValueError(f"vertex line {' '.join(words)!r} has fewer than 3 coordinates")
            vertices.append(words[1:4])
        elif words[0] == "f":
            polygons.append([_obj_index(w, len(vertices)) for w in words[1:]])
    return _mesh(np.asarray(vertices, dtype=np.float64).reshape(-1, 3), fan_triangulate(polygons))


# ---------------------------------------------------------------------------------------------
# Point files


def _npy_table(data: bytes) -> np.ndarray:
    """The array of a ``.npy`` file's bytes (never unpickled)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # numpy raises EOFError, tokenize.TokenError, ... besides ValueError on a garbled file
        raise ValueError(f"not a valid .npy file ({type(err).__name__}: {err})") from err


def _text_table(data: bytes) -> np.ndarray:
    """The float64 ``[n, k]`` table of text rows of numbers separated by whitespace or commas."""
    text = data.decode("utf-8").replace(",", " ")
    if not text.strip():
        raise ValueError("no vertices or points")
    return np.loadtxt(io.StringIO(text), dtype=np.float64, ndmin=2)


def parse_npy(data: bytes) -> Mesh:
    """Parse a ``.npy`` array of shape ``[n, >=3]`` (xyz first) as a point set."""
    return _points_from_table(_npy_table(data))


def parse_point_text(data: bytes) -> Mesh:
    """Parse text rows of ``>=3`` numbers separated by whitespace or commas (xyz first)."""
    return _points_from_table(_text_table(data))


def labelled_points_from_table(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points float64 ``[n, 3]`` (the first three columns) and labels int64 ``[n]`` (the last column) of
    an ``[n, >=4]`` table (``x y z label``, or ``x y z ... label``); ValueError for a label that is not
    a whole number >= 0."""
    if table.ndim != 2 or table.shape[1] < 4:
        raise ValueError(f"expected an array of shape [n, >=4] (x y z ... label), found shape {list(table.shape)}")
    points = _points_from_table(table).vertices
    column = table[:, -1]
    bad = np.flatnonzero(~np.isfinite(column) | (column != np.round(column))) if column.dtype.kind == "f" else []
    if len(bad):
        raise ValueError(f"label column (column {table.shape[1] - 1}) holds a non-integer value {column[bad[0]]} "
                         f"at point {bad[0]} ({len(bad)} such points); expected whole part numbers")
    negative = np.flatnonzero(column < 0)
    if len(negative):
        raise ValueError(f"label column (column {table.shape[1] - 1}) holds a negative label {column[negative[0]]:g} "
                         f"at point {negative[0]}; expected part numbers 0, 1, ...")
    return points, column.astype(np.int64)


_LABEL_TABLES = {".npy": _npy_table, ".txt": _text_table}
LABELLED_SUFFIXES = tuple(_LABEL_TABLES)


def read_labelled_points(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Points float64 ``[n, 3]`` and per-point labels int64 ``[n]`` of a ``.npy`` or ``.txt`` table whose
    last column is the label (see :func:`labelled_points_from_table`).

    Raises DatasetError starting with ``path`` when the file is missing, of another type, or malformed.
    """
    path = Path(path)
    reader = _LABEL_TABLES.get(path.suffix.lower())
    if reader is None:
        raise DatasetError(f"{path}: per-point labels need a file of type {LABELLED_SUFFIXES}")
    try:
        return labelled_points_from_table(reader(path.read_bytes()))
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read per-point labels from {path.suffix.lower()} file: {err}") from err


def parse_pcd(data: bytes) -> Mesh:
    """Parse a PCL/Open3D ``.pcd`` file (ascii, binary or binary_compressed) as a point set."""
    return _mesh(read_pcd_xyz(data), _no_faces())


_PARSERS = {
    ".ply": parse_ply,
    ".pcd": parse_pcd,
    ".off": parse_off,
    ".obj": parse_obj,
    ".npy": parse_npy,
    ".txt": parse_point_text,
}
SUPPORTED_SUFFIXES = tuple(_PARSERS)


def read_geometry(path: str | Path) -> Mesh:
    """Read a mesh or point file, chosen by suffix (case-insensitive) from SUPPORTED_SUFFIXES.

    Raises DatasetError naming ``path`` when the file is missing, unsupported or malformed.
    """
    path = Path(path)
    parser = _PARSERS.get(path.suffix.lower())
    if parser is None:
        raise DatasetError(f"{path}: unsupported file type, expected one of {SUPPORTED_SUFFIXES}")
    try:
        return parser(path.read_bytes())
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read {path.suffix.lower()} file: {err}") from err
