"""Geometry readers (PLY, OFF, OBJ, PCD, npy, txt) and area-weighted surface sampling."""

import io
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from any2point_fast.data import DatasetError, Mesh, read_geometry, sample_surface

# A unit square in the z=0 plane as two triangles, plus a quad face variant.
SQUARE = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=np.float64)
SQUARE_FAN = np.array([[0, 1, 2], [0, 2, 3]])


def write_ply(path, vertices, faces=(), fmt="ascii", coord="float"):
    """A PLY file with vertex x, y, z (+ an extra uchar property) and an optional face list."""
    header = [
        "ply",
        f"format {fmt} 1.0",
        "comment written by the test",
        f"element vertex {len(vertices)}",
        *(f"property {coord} {axis}" for axis in "xyz"),
        "property uchar red",
    ]
    if len(faces):
        header += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
    header.append("end_header")
    if fmt == "ascii":
        rows = [text_row(v) + " 7" for v in vertices]
        rows += [" ".join(map(str, [len(face), *face])) for face in faces]
        body = ("\n".join(rows) + "\n").encode()
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        code = "f" if coord == "float" else "d"
        body = b"".join(struct.pack(f"{order}{code * 3}B", *v, 7) for v in vertices)
        body += b"".join(struct.pack(f"{order}B{len(f)}i", len(f), *f) for f in faces)
    path.write_bytes(("\n".join(header) + "\n").encode() + body)
    return path


def text_row(values, separator=" "):
    """Exact decimal text of a row of floats."""
    return separator.join(repr(float(v)) for v in values)


def random_vertices(count, seed=0):
    return np.random.default_rng(seed).normal(size=(count, 3))


def corrupted(data: bytes, seed: int, count: int = 4) -> bytes:
    """``data`` with ``count`` bytes at random places set to random values, cut short one time in five (seeded)."""
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    for position in rng.integers(0, len(out), count):
        out[position] = rng.integers(0, 256)
    return bytes(out[: rng.integers(0, len(out))] if rng.random() < 0.2 else out)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# PLY


@pytest.mark.parametrize("fmt", ["ascii", "binary_little_endian", "binary_big_endian"])
@pytest.mark.parametrize("coord", ["float", "double"])
def test_ply_point_cloud_values_round_trip(tmp_path, fmt, coord):
    vertices = random_vertices(50)
    mesh = read_geometry(write_ply(tmp_path / "cloud.ply", vertices, fmt=fmt, coord=coord))
    expected = vertices.astype(np.float32) if coord == "float" and fmt != "ascii" else vertices
    np.testing.assert_array_equal(mesh.vertices, expected.astype(np.float64))
    assert mesh.is_point_set and mesh.faces.shape == (0, 3)


@pytest.mark.parametrize("fmt", ["ascii", "binary_little_endian"])
def test_ply_triangle_faces(tmp_path, fmt):
    faces = [[0, 1, 2], [0, 2, 3], [3, 1, 0]]
    mesh = read_geometry(write_ply(tmp_path / "m.ply", SQUARE, faces, fmt=fmt))
    np.testing.assert_array_equal(mesh.vertices, SQUARE)
    np.testing.assert_array_equal(mesh.faces, faces)
    assert mesh.faces.dtype == np.int64


@pytest.mark.parametrize("fmt", ["ascii", "binary_little_endian"])
def test_ply_polygon_faces_become_fans(tmp_path, fmt):
    vertices = np.vstack([SQUARE, [[2, 0, 0], [2, 1, 0]]])
    faces = [[0, 1, 2, 3], [1, 4, 5], [1, 4, 5, 2]]  # quad, triangle, quad: variable lengths
    mesh = read_geometry(write_ply(tmp_path / "m.ply", vertices, faces, fmt=fmt))
    np.testing.assert_array_equal(mesh.faces, [[0, 1, 2], [0, 2, 3], [1, 4, 5], [1, 4, 5], [1, 5, 2]])


def test_ply_suffix_is_case_insensitive(tmp_path):
    mesh = read_geometry(write_ply(tmp_path / "UPPER.PLY", SQUARE, [[0, 1, 2]]))
    np.testing.assert_array_equal(mesh.faces, [[0, 1, 2]])


def test_ply_truncated_binary_body_is_an_error(tmp_path):
    path = write_ply(tmp_path / "cut.ply", random_vertices(10), fmt="binary_little_endian")
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetError, match=f"{path}.*ends inside PLY element 'vertex'"):
        read_geometry(path)


def test_ply_without_xyz_is_an_error(tmp_path):
    path = tmp_path / "bad.ply"
    path.write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float a\nend_header\n1\n")
    with pytest.raises(DatasetError, match=f"{path}.*expected vertex properties x, y, z, found \\['a'\\]"):
        read_geometry(path)


def test_ply_face_index_out_of_range_is_an_error(tmp_path):
    path = write_ply(tmp_path / "bad.ply", SQUARE, [[0, 1, 9]], fmt="binary_little_endian")
    with pytest.raises(DatasetError, match=f"{path}.*face index out of range"):
        read_geometry(path)


def test_not_a_ply_file_is_an_error(tmp_path):
    path = tmp_path / "text.ply"
    path.write_text("hello\n")
    with pytest.raises(DatasetError, match=f"{path}.*'ply'"):
        read_geometry(path)


# ---------------------------------------------------------------------------------------------
# OFF


@pytest.mark.parametrize(
    "header",
    ["OFF\n4 2 0\n", "OFF4 2 0\n", "OFF 4 2 0\n", "# comment\nOFF\n# counts next\n4 2 0\n"],
    ids=["standard", "malformed-glued", "same-line", "comments"],
)
def test_off_headers(tmp_path, header):
    body = "".join(text_row(v) + "\n" for v in SQUARE) + "3 0 1 2\n3 0 2 3\n"
    path = tmp_path / "m.off"
    path.write_text(header + body)
    mesh = read_geometry(path)
    np.testing.assert_array_equal(mesh.vertices, SQUARE)
    np.testing.assert_array_equal(mesh.faces, SQUARE_FAN)


def test_off_quad_faces_and_colours(tmp_path):
    path = tmp_path / "m.off"
    path.write_text("OFF\n4 1 0\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n4 0 1 2 3 255 0 0\n")
    np.testing.assert_array_equal(read_geometry(path).faces, SQUARE_FAN)


def test_off_with_missing_lines_is_an_error(tmp_path):
    path = tmp_path / "short.off"
    path.write_text("OFF\n4 2 0\n0 0 0\n1 0 0\n")
    with pytest.raises(DatasetError, match=f"{path}.*expected 4 vertex and 2 face lines, found 2"):
        read_geometry(path)


def test_off_without_keyword_is_an_error(tmp_path):
    path = tmp_path / "nokey.off"
    path.write_text("4 2 0\n")
    with pytest.raises(DatasetError, match=f"{path}.*'OFF'"):
        read_geometry(path)


# ---------------------------------------------------------------------------------------------
# OBJ


def test_obj_vertices_faces_slashes_negative_indices(tmp_path):
    path = tmp_path / "m.obj"
    path.write_text(
        "# exported\nmtllib m.mtl\no square\n"
        + "".join(f"v {text_row(v)}\n" for v in SQUARE)
        + "vt 0 0\nvn 0 0 1\ns off\n"
        + "f 1/1/1 2/1/1 3/1/1\n"  # v/vt/vn
        + "f 1//1 3//1 4//1\n"  # v//vn
        + "f -4 -3 -2 -1\n"  # relative quad -> two triangles
    )
    mesh = read_geometry(path)
    np.testing.assert_array_equal(mesh.vertices, SQUARE)
    np.testing.assert_array_equal(mesh.faces, [[0, 1, 2], [0, 2, 3], [0, 1, 2], [0, 2, 3]])


def test_obj_face_index_out_of_range_is_an_error(tmp_path):
    path = tmp_path / "bad.obj"
    path.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 4\n")
    with pytest.raises(DatasetError, match=f"{path}.*face index out of range"):
        read_geometry(path)


def test_obj_face_with_two_vertices_is_an_error(tmp_path):
    path = tmp_path / "bad.obj"
    path.write_text("v 0 0 0\nv 1 0 0\nf 1 2\n")
    with pytest.raises(DatasetError, match=f"{path}.*at least 3"):
        read_geometry(path)


# ---------------------------------------------------------------------------------------------
# Point files


def test_npy_uses_xyz_columns(tmp_path):
    table = np.random.default_rng(1).normal(size=(30, 6)).astype(np.float32)
    np.save(tmp_path / "p.npy", table)
    mesh = read_geometry(tmp_path / "p.npy")
    np.testing.assert_array_equal(mesh.vertices, table[:, :3].astype(np.float64))
    assert mesh.is_point_set


@pytest.mark.parametrize("separator", [",", " ", "\t", ", "])
def test_text_points_any_separator(tmp_path, separator):
    table = random_vertices(20, seed=2)
    path = tmp_path / "p.txt"
    path.write_text("".join(text_row([*row, 0.5], separator) + "\n" for row in table))
    np.testing.assert_array_equal(read_geometry(path).vertices, table)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.npy", np.zeros((5, 2)), r"expected an array of shape \[n, >=3\], found shape \[5, 2\]"),
        ("p.npy", np.zeros(5), r"found shape \[5\]"),
        ("p.npy", np.ones((4, 3), np.complex64), "expected integer or real numbers, found dtype complex64"),
        ("p.txt", "1 2 3\n4 5\n", "cannot read"),
        ("p.txt", "1 2 nan\n", "non-finite"),
        ("p.txt", "", "no vertices or points"),
    ],
)
def test_malformed_point_files_are_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        np.save(path, content)
    with pytest.raises(DatasetError, match=f"{path}.*{message}"):
        read_geometry(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "EOFError"),  # empty
        (npy_bytes(np.zeros((4, 3)))[:20], "reading array header"),  # truncated
        (npy_bytes(np.zeros((4, 3))).replace(b"}", b" "), "TokenError"),  # the header's dict is never closed
    ],
    ids=["empty", "truncated", "unclosed-header"],
)
def test_corrupt_npy_files_are_errors(tmp_path, content, message):
    path = tmp_path / "p.npy"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=f"{path}: cannot read .npy file: not a valid .npy file .*{message}"):
        read_geometry(path)


# ---------------------------------------------------------------------------------------------
# PCD

# (name, TYPE, SIZE, COUNT): xyz permuted among other fields, mixed types, a 3-value normal, a padding field.
PCD_FIELDS = [("intensity", "F", 4, 1), ("z", "F", 8, 1), ("normal", "F", 4, 3), ("x", "F", 4, 1),
              ("rgb", "U", 4, 1), ("_", "U", 1, 2), ("y", "I", 2, 1)]


def pcd_columns(count, seed=0):
    """Values of every PCD_FIELDS field, exactly representable in the field's type."""
    rng = np.random.default_rng(seed)
    dtypes = {"F4": np.float32, "F8": np.float64, "U4": np.uint32, "U1": np.uint8, "I2": np.int16}
    columns = {}
    for name, kind, size, width in PCD_FIELDS:
        dtype = dtypes[f"{kind}{size}"]
        values = rng.normal(size=(count, width)) * 100 if kind == "F" else rng.integers(-300 if kind == "I" else 0,
                                                                                          250, size=(count, width))
        columns[name] = values.astype(dtype)
    return columns


def lzf_compress(raw: bytes) -> bytes:
    """A plain greedy LZF encoder (liblzf's stream format): longest earlier match of >= 3 bytes within 8 KiB."""
    out, literal, pos = bytearray(), bytearray(), 0

    def flush():
        for start in range(0, len(literal), 32):
            chunk = literal[start:start + 32]
            out.extend([len(chunk) - 1, *chunk])
        literal.clear()

    while pos < len(raw):
        best_len, best_dist = 0, 0
        for dist in range(1, min(pos, 8192) + 1):
            length = 0
            while pos + length < len(raw) and length < 264 and raw[pos + length - dist] == raw[pos + length]:
                length += 1
            if length > best_len:
                best_len, best_dist = length, dist
        if best_len < 3:
            literal.append(raw[pos])
            pos += 1
            continue
        flush()
        code, off = best_len - 2, best_dist - 1
        if code < 7:
            out.extend([(code << 5) | (off >> 8), off & 255])
        else:
            out.extend([(7 << 5) | (off >> 8), code - 7, off & 255])
        pos += best_len
    flush()
    return bytes(out)


def pcd_bytes(columns, data="ascii", fields=PCD_FIELDS, points=None, extra_header=""):
    """A PCD file holding ``columns`` (name -> [n, COUNT] array) in ``fields`` order."""
    count = len(next(iter(columns.values())))
    header = [
        "# .PCD v0.7 - Point Cloud Data file format",
        "VERSION 0.7",
        "FIELDS " + " ".join(f[0] for f in fields),
        "SIZE " + " ".join(str(f[2]) for f in fields),
        "TYPE " + " ".join(f[1] for f in fields),
        "COUNT " + " ".join(str(f[3]) for f in fields),
        f"WIDTH {count}",
        "HEIGHT 1",
        "VIEWPOINT 0 0 0 1 0 0 0",
        f"POINTS {count if points is None else points}",
        *([extra_header] if extra_header else []),
        f"DATA {data}",
    ]
    head = ("\n".join(header) + "\n").encode()
    if data == "ascii":
        rows = [" ".join(repr(v.item()) for f in fields for v in columns[f[0]][i]) for i in range(count)]
        return head + ("\n".join(rows) + "\n").encode()
    if data == "binary":
        record = np.dtype([(f"f{i}", columns[f[0]].dtype.newbyteorder("<"), (f[3],)) for i, f in enumerate(fields)])
        table = np.zeros(count, dtype=record)
        for i, f in enumerate(fields):
            table[f"f{i}"] = columns[f[0]]
        return head + table.tobytes()
    raw = b"".join(columns[f[0]].astype(columns[f[0]].dtype.newbyteorder("<")).tobytes() for f in fields)
    packed = lzf_compress(raw)
    return head + struct.pack("<II", len(packed), len(raw)) + packed


def pcd_xyz(columns):
    return np.concatenate([columns[a].astype(np.float64) for a in "xyz"], axis=1)


@pytest.mark.parametrize("data", ["ascii", "binary", "binary_compressed"])
def test_pcd_values_with_extra_fields_in_any_order(tmp_path, data):
    columns = pcd_columns(40)
    path = tmp_path / "scan.pcd"
    path.write_bytes(pcd_bytes(columns, data))
    mesh = read_geometry(path)
    np.testing.assert_array_equal(mesh.vertices, pcd_xyz(columns))
    assert mesh.is_point_set and mesh.faces.shape == (0, 3)


def test_pcd_minimal_header_and_plain_xyz(tmp_path):
    """COUNT, HEIGHT, VIEWPOINT and POINTS are optional (POINTS = WIDTH * HEIGHT)."""
    path = tmp_path / "p.PCD"
    path.write_text("FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nWIDTH 2\nDATA ascii\n0.5 -1.25 3\n1e-3 2 7.5\n")
    np.testing.assert_array_equal(read_geometry(path).vertices, [[0.5, -1.25, 3], [1e-3, 2, 7.5]])


def test_lzf_decompress_literals_and_overlapping_references():
    from any2point_fast.data.pcd import lzf_decompress

    # literal "abc", then 7 bytes from 3 back (overlapping: abcabca), then 10 (long form) from 1 back.
    stream = bytes([2, *b"abc", (5 << 5) | 0, 2, (7 << 5) | 0, 1, 0])
    assert lzf_decompress(stream, 20) == b"abc" + b"abcabca" + b"a" * 10
    raw = bytes(range(50)) * 3 + b"xyz" * 100
    assert lzf_decompress(lzf_compress(raw), len(raw)) == raw
    with pytest.raises(ValueError, match="4 bytes back, only 3 bytes decoded"):
        lzf_decompress(bytes([2, *b"abc", 1 << 5, 3]), 6)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda c: pcd_bytes(c, "binary")[:-5], "expected 720 bytes of binary point data .*found 715"),
        (lambda c: pcd_bytes(c, "ascii").rsplit(b"\n", 2)[0], "expected 20 point lines"),
        (lambda c: pcd_bytes(c, "binary_compressed")[:-3], "declares .* compressed bytes"),
        (lambda c: pcd_bytes(c, "ascii").replace(b"ascii\n", b"ascii\n7 "), "point line 1 has 11 values, expected 10"),
        (lambda c: pcd_bytes(c, "ascii", fields=PCD_FIELDS[:-1]), "'y' is missing in FIELDS"),
        (lambda c: pcd_bytes(c, "ascii").replace(b"TYPE F F", b"TYPE F X"), "field 'z' has TYPE X SIZE 8"),
        (lambda c: pcd_bytes(c, "ascii").replace(b"SIZE 4 8", b"SIZE 4"), "SIZE lists 6 values for 7 FIELDS"),
        (lambda c: pcd_bytes(c, "ascii").replace(b"DATA ascii", b"DATA text"), "PCD DATA 'text'"),
        (lambda c: pcd_bytes(c, "ascii").replace(b"DATA ascii", b"DATUM ascii"), "unexpected PCD header line"),
        (lambda c: pcd_bytes(c, "binary", points=21), "POINTS 21 differs from WIDTH \\* HEIGHT = 20"),
        (lambda c: pcd_bytes({k: v[:0] for k, v in c.items()}, "binary"), "no vertices or points"),
        (lambda c: pcd_bytes(c, "ascii").replace(b"\nSIZE", b"\nFIELDS x y z\nSIZE"), "lists FIELDS twice"),
        (lambda c: b"ply\nformat ascii 1.0\n", "unexpected PCD header line 'ply'"),
    ],
    ids=["binary-truncated", "ascii-truncated", "compressed-truncated", "ascii-long-line", "no-y", "bad-type",
         "size-count", "data-format", "bad-key", "points-mismatch", "zero-points", "repeated-key", "not-pcd"],
)
def test_malformed_pcd_files_are_errors(tmp_path, content, message):
    path = tmp_path / "bad.pcd"
    path.write_bytes(content(pcd_columns(20)))
    with pytest.raises(DatasetError, match=f"{path}: cannot read .pcd file: .*{message}"):
        read_geometry(path)


@pytest.mark.parametrize("data", ["ascii", "binary", "binary_compressed"])
def test_pcd_nan_points_are_refused_like_other_point_files(tmp_path, data):
    columns = pcd_columns(6)
    columns["x"][[2, 4], 0] = np.nan  # what organised scans store for "no return"
    path = tmp_path / "holes.pcd"
    path.write_bytes(pcd_bytes(columns, data))
    with pytest.raises(DatasetError, match=f"{path}: .*non-finite .* in 2 of 6 points \\(the first at row 2\\)"):
        read_geometry(path)


CUBE_CORNERS = "\n".join(f"{x} {y} {z}" for x in (0, 1) for y in (0, 1) for z in (0, 1))
VALID_FILES = {
    "ascii.ply": lambda path: write_ply(path, SQUARE, SQUARE_FAN),
    "binary.ply": lambda path: write_ply(path, SQUARE, [[0, 1, 2, 3]], fmt="binary_little_endian"),
    "mesh.off": lambda path: path.write_text(f"OFF\n8 3 0\n{CUBE_CORNERS}\n3 0 1 2\n4 4 5 6 7\n3 0 4 7\n"),
    "mesh.obj": lambda path: path.write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 1\nf 1 2 3\nf 1/1 2/2/2 3//3 -1\n"),
    "points.npy": lambda path: np.save(path, random_vertices(6)),
    "ascii.pcd": lambda path: path.write_bytes(pcd_bytes(pcd_columns(6), "ascii")),
    "binary.pcd": lambda path: path.write_bytes(pcd_bytes(pcd_columns(6), "binary")),
    "compressed.pcd": lambda path: path.write_bytes(pcd_bytes(pcd_columns(6), "binary_compressed")),
}


@pytest.mark.parametrize("name", list(VALID_FILES))
def test_corrupted_files_are_errors_naming_the_file(tmp_path, name):
    """Random corruptions of a valid file: each one still parses, or raises a DatasetError naming the file."""
    path = tmp_path / name
    VALID_FILES[name](path)
    valid, refused = path.read_bytes(), 0
    for seed in range(200):
        path.write_bytes(corrupted(valid, seed))
        try:
            read_geometry(path)
        except DatasetError as error:
            assert str(error).startswith(f"{path}: "), error
            refused += 1
    assert refused >= 20


def test_missing_and_unsupported_files_are_errors(tmp_path):
    with pytest.raises(DatasetError, match=f"{tmp_path / 'absent.off'}"):
        read_geometry(tmp_path / "absent.off")
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(DatasetError, match=f"{tmp_path / 'notes.md'}: unsupported file type"):
        read_geometry(tmp_path / "notes.md")


# ---------------------------------------------------------------------------------------------
# Surface sampling


def test_sampling_is_proportional_to_area_and_on_the_surface():
    # Triangle A (area 1) in the plane z=0, triangle B (area 3) in the plane z=5.
    vertices = np.array([[0, 0, 0], [2, 0, 0], [0, 1, 0], [0, 0, 5], [3, 0, 5], [0, 2, 5]], float)
    mesh = Mesh(vertices, np.array([[0, 1, 2], [3, 4, 5]]))
    points = sample_surface(mesh, 20000, np.random.default_rng(0))
    on_a, on_b = points[:, 2] == 0, points[:, 2] == 5
    assert (on_a | on_b).all()
    assert abs(on_a.mean() - 0.25) < 0.015
    # Inside each right triangle: x / width + y / height <= 1 and x, y >= 0.
    assert (points[:, :2] >= 0).all()
    assert (points[on_a, 0] / 2 + points[on_a, 1] / 1 <= 1 + 1e-12).all()
    assert (points[on_b, 0] / 3 + points[on_b, 1] / 2 <= 1 + 1e-12).all()
    # Uniform inside a triangle: the centroid of the samples is the triangle's centroid.
    np.testing.assert_allclose(points[on_b].mean(axis=0), [1, 2 / 3, 5], atol=0.03)


def test_sampling_is_deterministic_given_the_rng():
    mesh = Mesh(SQUARE, SQUARE_FAN)
    first = sample_surface(mesh, 100, np.random.default_rng(3))
    np.testing.assert_array_equal(first, sample_surface(mesh, 100, np.random.default_rng(3)))
    assert not np.array_equal(first, sample_surface(mesh, 100, np.random.default_rng(4)))


def test_sampling_a_zero_area_mesh_is_an_error():
    line = Mesh(np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0.0]]), np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match="total area 0"):
        sample_surface(line, 10, np.random.default_rng(0))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=9, max_size=9), st.integers(0, 2**32 - 1))
def test_samples_lie_inside_any_triangle(coords, seed):
    triangle = np.asarray(coords, dtype=np.float64).reshape(3, 3)
    a, b, c = triangle
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a))
    if area < 1e-3:
        return
    points = sample_surface(Mesh(triangle, np.array([[0, 1, 2]])), 200, np.random.default_rng(seed))
    # Barycentric coordinates by least squares; all in [0, 1] for a point of the triangle.
    uv, *_ = np.linalg.lstsq(np.stack([b - a, c - a], axis=1), (points - a).T, rcond=None)
    assert (uv >= -1e-6).all() and (uv.sum(axis=0) <= 1 + 1e-6).all()
    np.testing.assert_allclose(a + (np.stack([b - a, c - a], axis=1) @ uv).T, points, atol=1e-6 * (1 + area))
