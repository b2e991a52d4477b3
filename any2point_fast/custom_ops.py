"""The fused ops as ``torch.library`` custom ops, so that ``torch.compile`` traces a whole model in one graph.

Eagerly, :mod:`any2point_fast.ops` calls the implementation the registry chooses, as it always
did. Inside a region that ``torch.compile`` traces, every op of :mod:`any2point_fast.ops` goes
through :func:`call` instead, which calls the custom op ``any2point::<op>``:

- its arguments are tensors and primitives only: structured ones (a
  :class:`~any2point_fast.geometry.ProjectionSpec`, :class:`~any2point_fast.geometry.Segments`,
  tuples of offsets) are flattened at the boundary, and the implementation's result is packed into
  tensors (``bucket_sort``'s segments: ids, order, offsets, the ``[V + 1]`` view offsets and the
  0-d longest length, whose values are data: see :class:`~any2point_fast.geometry.Segments`);
- its first argument is the backend name (:func:`any2point_fast.ops.get_backend`, a guarded global
  of the traced code); the body chooses the implementation from the registry at run time, on the
  real tensors, and calls it. The body is opaque to dynamo: Triton launches on CUDA, the compiled
  CPU kernels, and every value the implementations read on the host (``.tolist()``, bucket
  lengths) stay outside the graph;
- a fake implementation gives the outputs' shapes and dtypes (a data-dependent count, the
  number of non-empty buckets, is a new unbacked size);
- its autograd formula is the custom op ``any2point::<op>_backward``, which returns the gradients
  of the implementation's own backward, so compiled gradients are the eager ones. Where an input
  needs a gradient (``needs``, fixed when the graph is traced), the forward body runs the
  implementation with autograd recording and keeps that graph (:data:`_RECORDED`) under a handle,
  a one-element tensor it returns last and that the autograd context saves; the backward op runs
  the kept graph's backward, as eager code would. A graph goes when its handle does (a forward
  whose backward never runs). Where no graph is found (a second backward; a handle copied
  by autograd, which saves an output as a new tensor: the custom op called eagerly, whose caller
  drops the handle), the backward op runs the forward again, with autograd recording.

The CUDA route is this same mechanism with ``triton`` chosen inside the body, so what holds for
the graph on the CPU holds there by construction.

An op added to :mod:`any2point_fast.registry` needs one :class:`Boundary` in :data:`BOUNDARIES`: its
schema, which flat argument chooses the implementation, a fake, and the flatten/unflatten and
pack/unpack functions where its arguments or result are not already tensors and primitives.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import registry
from .geometry import ProjectionSpec, Segments

#: The ``torch.ops`` namespace of the custom ops.
NAMESPACE = "any2point"


def _same(*args: Any) -> tuple:
    return args


def _single(result: Any) -> tuple:
    return (result,)


def _first(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    return outputs[0]


def _as_tuple(outputs: Sequence[torch.Tensor]) -> tuple:
    return tuple(outputs)


@dataclass(frozen=True)
class Boundary:
    """How one op crosses the custom-op boundary.

    Attributes:
        arguments: the schema of the flat arguments (after the backend name), e.g.
            ``"Tensor xyz, SymInt num_samples"``.
        returns: the schema of the flat outputs, e.g. ``"Tensor"`` or ``"(Tensor, Tensor)"``.
        main: index of the flat argument whose device and dtype choose the implementation.
        fake: flat arguments → flat outputs of the right shapes and dtypes (fake tensors).
        flatten: the op's arguments (as :mod:`any2point_fast.ops` takes them) → flat arguments.
        unflatten: flat arguments (real tensors, in the body) → the implementation's arguments.
        pack: the implementation's result → the tuple of flat outputs.
        unpack: the tuple of flat outputs → the op's result.
    """

    arguments: str
    returns: str
    main: int
    fake: Callable[..., Any]
    flatten: Callable[..., tuple] = _same
    unflatten: Callable[..., tuple] = _same
    pack: Callable[[Any], tuple] = _single
    unpack: Callable[[Sequence[torch.Tensor]], Any] = _first


# ------------------------------------------------------------------------------------ the boundaries
def _flatten_projection(centers, pe_table, spec: ProjectionSpec):
    return (centers, pe_table, spec.kind, spec.views, float(spec.segment_length), list(spec.canvas_size),
            int(spec.patch_size), float(spec.camera_distance))


def _unflatten_projection(centers, pe_table, kind, views, segment_length, canvas_size, patch_size, camera_distance):
    return centers, pe_table, ProjectionSpec(kind, views, segment_length, tuple(canvas_size), patch_size,
                                             camera_distance)


def _fake_projection(centers, pe_table, kind, views, *_):
    batch, tokens, _ = centers.shape
    return (pe_table.new_empty(batch, tokens, pe_table.shape[-1]),
            centers.new_empty(views.shape[0], batch, tokens, dtype=torch.int64))


def _pack_segments(segments: Segments) -> tuple:
    """Segments as tensors: ids, order, offsets, ``[V + 1]`` view offsets and the 0-d longest length."""
    device = segments.offsets.device
    return (segments.segment_ids, segments.perm, segments.offsets,
            torch.tensor(segments.view_offsets, dtype=torch.int64, device=device),
            torch.tensor(segments.max_len, dtype=torch.int64, device=device))


def _unpack_segments(outputs: Sequence[torch.Tensor]) -> Segments:
    """The segments of traced code: their view offsets and longest length stay tensors."""
    return Segments(*outputs)


#: The segments rebuilt in the bodies, by ``id`` of their ids tensor; an entry goes when that tensor does.
_SEGMENTS: dict[int, tuple[weakref.ref, Segments]] = {}


def _real_segments(segment_ids, perm, offsets, view_offsets, max_len) -> Segments:
    """The segments an implementation reads, with the host values of their view offsets and longest length:
    one object per ids tensor, so that the bookkeeping the implementations derive from it
    (:meth:`Segments.derived`) is built once for all the blocks of a compiled model, as in eager code."""
    entry = _SEGMENTS.get(id(segment_ids))
    if entry is None or entry[0]() is not segment_ids:
        key = id(segment_ids)
        # the entry holds an alias of the ids, not the tensor object itself, which would then never be freed
        segments = Segments(segment_ids.detach(), perm, offsets, tuple(view_offsets.tolist()), int(max_len))
        entry = _SEGMENTS[key] = (weakref.ref(segment_ids, lambda _: _SEGMENTS.pop(key, None)), segments)
    return entry[1]


def _fake_bucket_sort(bucket_ids, num_buckets):
    views = bucket_ids.shape[0]
    num_offsets = torch.library.get_ctx().new_dynamic_size(min=2)  # S + 1, S ≥ 1 non-empty segments
    return (bucket_ids.new_empty(bucket_ids.shape, dtype=torch.int64),
            bucket_ids.new_empty(bucket_ids.numel(), dtype=torch.int64),
            bucket_ids.new_empty(num_offsets, dtype=torch.int64),
            bucket_ids.new_empty(views + 1, dtype=torch.int64), bucket_ids.new_empty((), dtype=torch.int64))


def _flatten_attention(x, segments, *rest):
    return (x, *_pack_segments_or_traced(segments), *rest)


def _pack_segments_or_traced(segments: Segments) -> tuple:
    """The five tensors of ``segments``, whether traced (tensor view offsets) or built eagerly (ints)."""
    if isinstance(segments.view_offsets, torch.Tensor):
        return segments.segment_ids, segments.perm, segments.offsets, segments.view_offsets, segments.max_len
    return _pack_segments(segments)


def _unflatten_attention(x, segment_ids, perm, offsets, view_offsets, max_len, *rest):
    return (x, _real_segments(segment_ids, perm, offsets, view_offsets, max_len), *rest)


def _fake_attention(x, segment_ids, perm, offsets, *_):
    return x.new_empty(offsets.shape[0] - 1, x.shape[-1])


def _as_tensor(values, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype, device=like.device)


def _flatten_batch_norm(rows, offsets, weight, bias, running_mean, running_var, batch, eps):
    return (rows, _as_tensor(offsets, rows, torch.int64), weight, bias, running_mean, running_var,
            _as_tensor(batch, rows, torch.bool), float(eps))


def _unflatten_batch_norm(rows, offsets, weight, bias, running_mean, running_var, batch, eps):
    return rows, tuple(offsets.tolist()), weight, bias, running_mean, running_var, tuple(batch.tolist()), eps


def _fake_batch_norm(rows, offsets, weight, *_):
    stats = weight.shape
    return rows.new_empty(rows.shape), rows.new_empty(stats, dtype=torch.float32), rows.new_empty(stats,
                                                                                                 dtype=torch.float32)


def _fake_like(index: int):
    return lambda *args: args[index].new_empty(args[index].shape)


def _fake_aggregate(feat, offsets, centre_index, neighbour_index, weight1, *_):
    stats = torch.promote_types(feat.dtype, torch.float32)
    hidden, dim = weight1.shape
    return (feat.new_empty(*centre_index.shape, dim), *(feat.new_empty(size, dtype=stats)
                                                        for size in (hidden, hidden, dim, dim)))


#: The boundary of every op of the registry.
BOUNDARIES: dict[str, Boundary] = {
    "farthest_point_sample": Boundary(
        "Tensor xyz, SymInt num_samples", "Tensor", 0,
        lambda xyz, num_samples: xyz.new_empty(xyz.shape[0], num_samples, dtype=torch.int64)),
    "knn": Boundary(
        "Tensor query, Tensor points, SymInt k", "Tensor", 0,
        lambda query, points, k: query.new_empty(*query.shape[:2], k, dtype=torch.int64)),
    "project_pe": Boundary(
        "Tensor centers, Tensor pe_table, str kind, Tensor views, float segment_length, SymInt[] canvas_size, "
        "SymInt patch_size, float camera_distance", "(Tensor, Tensor)", 1, _fake_projection,
        _flatten_projection, _unflatten_projection, tuple, _as_tuple),
    "bucket_sort": Boundary(
        "Tensor bucket_ids, SymInt num_buckets", "(Tensor, Tensor, Tensor, Tensor, Tensor)", 0, _fake_bucket_sort,
        pack=_pack_segments, unpack=_unpack_segments),
    "neighborhood_attention_pool": Boundary(
        "Tensor x, Tensor segment_ids, Tensor perm, Tensor offsets, Tensor view_offsets, Tensor max_len, "
        "Tensor ln_weight, Tensor ln_bias, Tensor qkv_weight, Tensor qkv_bias, Tensor out_weight, Tensor out_bias, "
        "SymInt num_heads, str pooling, float eps", "Tensor", 0, _fake_attention,
        _flatten_attention, _unflatten_attention),
    "segment_pool": Boundary(
        "Tensor values, Tensor segment_ids, SymInt num_segments, str pooling", "Tensor", 0,
        lambda values, ids, num_segments, pooling: values.new_empty(num_segments, values.shape[1])),
    "batch_norm_gelu": Boundary(
        "Tensor rows, Tensor offsets, Tensor weight, Tensor bias, Tensor running_mean, Tensor running_var, "
        "Tensor batch, float eps", "(Tensor, Tensor, Tensor)", 0, _fake_batch_norm,
        _flatten_batch_norm, _unflatten_batch_norm, tuple, _as_tuple),
    "ensemble_propagate": Boundary(
        "Tensor x, Tensor base_rows, Tensor base_ids, Tensor view_rows, Tensor view_ids, float coef", "Tensor", 0,
        _fake_like(0)),
    "neighborhood_aggregate": Boundary(
        "Tensor feat, Tensor offsets, Tensor centre_index, Tensor neighbour_index, Tensor weight1, "
        "Tensor norm1_weight, Tensor norm1_bias, Tensor norm1_mean, Tensor norm1_var, Tensor weight2, "
        "Tensor norm2_weight, Tensor norm2_bias, Tensor norm2_mean, Tensor norm2_var, bool training, float eps, "
        "float alpha, float beta", "(Tensor, Tensor, Tensor, Tensor, Tensor)", 0, _fake_aggregate,
        pack=tuple, unpack=_as_tuple),
    "interpolate_features": Boundary(
        "Tensor points, Tensor centers, Tensor features, float eps", "Tensor", 2,
        lambda points, centers, features, eps: features.new_empty(*points.shape[:2], features.shape[-1])),
}


# ------------------------------------------------------------------------------------ the mechanism
def _implementation(name: str, backend: str, flat: Sequence[Any]) -> Callable:
    main = flat[BOUNDARIES[name].main]
    return registry.choose(name, backend, main.device, main.dtype).function()


def _fresh(outputs: Sequence[torch.Tensor], inputs: Sequence[Any]) -> list[torch.Tensor]:
    """``outputs`` contiguous, as the fakes make them (a compiled graph may rely on their strides), each
    cloned where it shares memory with an input or an earlier output: a custom op's outputs never alias
    (an implementation may return an input, or a gradient, as it is)."""
    seen = {arg.untyped_storage().data_ptr() for arg in inputs if isinstance(arg, torch.Tensor)}
    fresh = []
    for out in outputs:
        out = out.contiguous()
        if out.untyped_storage().data_ptr() in seen:
            out = out.clone()
        seen.add(out.untyped_storage().data_ptr())
        fresh.append(out)
    return fresh


@dataclass
class _Recorded:
    """A forward's autograd graph, kept for its backward: the inputs it differentiates with respect
    to, its outputs (attached to the graph), and what identifies the call's tensor arguments."""

    wrt: list[torch.Tensor]
    outputs: tuple[torch.Tensor, ...]
    arguments: list[tuple]


#: The graphs recorded by forward bodies, by the address of their handle's storage.
_RECORDED: dict[int, _Recorded] = {}


def _identity(flat: Sequence[Any]) -> list[tuple]:
    """What identifies a call's tensor arguments for :data:`_RECORDED`: their storage, offset, shape and strides."""
    return [(arg.untyped_storage().data_ptr(), arg.storage_offset(), tuple(arg.shape), arg.stride())
            for arg in flat if isinstance(arg, torch.Tensor)]


def _handle(like: torch.Tensor) -> torch.Tensor:
    """A forward's handle: one int64 zero on the device of ``like`` (the key is its storage's address,
    so that the value, which compiled code may compare, is always the same)."""
    return like.new_zeros(1, dtype=torch.int64)


def _record(name: str, backend: str, flat: Sequence[Any], needs: Sequence[bool]) -> _Recorded:
    """Op ``name``'s implementation run on ``flat`` with autograd recording, differentiable in the
    arguments that ``needs`` marks."""
    boundary = BOUNDARIES[name]
    inputs = [arg.detach().requires_grad_() if need else arg for arg, need in zip(flat, needs)]
    with _autograd_recording():
        outputs = boundary.pack(_implementation(name, backend, inputs)(*boundary.unflatten(*inputs)))
    return _Recorded([arg for arg, need in zip(inputs, needs) if need], tuple(outputs), _identity(flat))


def _forward(name: str):
    boundary = BOUNDARIES[name]

    def forward(backend: str, needs: list[bool], *flat: Any):
        handle = _handle(flat[boundary.main])
        if not any(needs):
            outputs = _implementation(name, backend, flat)(*boundary.unflatten(*flat))
            return (*_fresh(boundary.pack(outputs), flat), handle)
        key = handle.untyped_storage().data_ptr()
        recorded = _RECORDED[key] = _record(name, backend, flat, needs)
        weakref.finalize(handle, _RECORDED.pop, key, None)
        # copies: compiled code may reuse an output's memory once it is dead, and the graph may have saved it
        return (*(out.detach().clone(memory_format=torch.contiguous_format) for out in recorded.outputs), handle)

    return forward


@contextlib.contextmanager
def _autograd_recording() -> Iterator[None]:
    """Autograd on inside a custom op's body, which the dispatcher runs below the autograd keys."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in ("AutogradCPU", "AutogradCUDA", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView"):
        exclude = exclude.remove(getattr(torch._C.DispatchKey, key))
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def _backward(name: str):
    def backward(backend: str, handle: torch.Tensor, grads: list[torch.Tensor | None], needs: list[bool],
                 *flat: Any) -> list[torch.Tensor]:
        recorded = _RECORDED.pop(handle.untyped_storage().data_ptr(), None)
        if recorded is not None and (len(recorded.wrt) != sum(needs) or recorded.arguments != _identity(flat)):
            recorded = None
        if recorded is None:  # the forward again, recording
            recorded = _record(name, backend, flat, needs)
        with _autograd_recording():
            pairs = [(out, grad) for out, grad in zip(recorded.outputs, grads)
                     if grad is not None and out.requires_grad]
            found = torch.autograd.grad([out for out, _ in pairs], recorded.wrt, [grad for _, grad in pairs],
                                        allow_unused=True) if pairs else [None] * len(recorded.wrt)
        return _fresh([torch.zeros_like(arg) if grad is None else grad for arg, grad in zip(recorded.wrt, found)],
                      [*grads, *flat])

    return backward


def _fake_backward(backend, handle, grads, needs, *flat):
    return [arg.new_empty(arg.shape) for arg, need in zip(flat, needs) if need]


def _with_handle(returns: str) -> str:
    """A forward's return schema with the handle last: ``Tensor`` → ``(Tensor, Tensor)``."""
    inner = returns[1:-1] if returns.startswith("(") else returns
    return f"({inner}, Tensor)"


def _define(name: str) -> torch.library.CustomOpDef:
    """``any2point::<name>`` and its backward ``any2point::<name>_backward``."""
    boundary = BOUNDARIES[name]
    op = torch.library.custom_op(
        f"{NAMESPACE}::{name}", _forward(name), mutates_args=(),
        schema=f"(str backend, bool[] needs, {boundary.arguments}) -> {_with_handle(boundary.returns)}")

    def fake(backend, needs, *flat):
        outputs = boundary.fake(*flat)
        return (*(outputs if isinstance(outputs, tuple) else (outputs,)), _handle(flat[boundary.main]))

    op.register_fake(fake)
    backward_op = torch.library.custom_op(
        f"{NAMESPACE}::{name}_backward", _backward(name), mutates_args=(),
        schema=f"(str backend, Tensor handle, Tensor?[] grads, bool[] needs, {boundary.arguments}) -> Tensor[]")
    backward_op.register_fake(_fake_backward)

    def setup_context(ctx, inputs, output):
        backend, _, *flat = inputs
        tensors = [i for i, arg in enumerate(flat) if isinstance(arg, torch.Tensor)]
        ctx.save_for_backward(*(flat[i] for i in tensors), output[-1])
        ctx.backend, ctx.tensors = backend, tensors
        ctx.others = {i: arg for i, arg in enumerate(flat) if not isinstance(arg, torch.Tensor)}

    def differentiate(ctx, *grads):
        *saved, handle = ctx.saved_tensors
        flat = [ctx.others.get(i) for i in range(len(ctx.tensors) + len(ctx.others))]
        for i, tensor in zip(ctx.tensors, saved):
            flat[i] = tensor
        needs = [bool(need) for need in ctx.needs_input_grad[2:]]
        found = iter(backward_op(ctx.backend, handle, list(grads[:-1]), needs, *flat) if any(needs) else ())
        return (None, None, *(next(found) if need else None for need in needs))

    op.register_autograd(differentiate, setup_context=setup_context)
    return op


_OPS: dict[str, torch.library.CustomOpDef] = {name: _define(name) for name in BOUNDARIES}


def custom_op(name: str) -> torch.library.CustomOpDef:
    """The custom op ``any2point::<name>`` of a registered op (called with :func:`arguments`); it returns
    the flat outputs, then the handle of its recorded graph."""
    return _OPS[name]


def arguments(name: str, backend: str, *args: Any) -> tuple:
    """The custom op's arguments for ``args`` as :mod:`any2point_fast.ops` takes them: the backend, which
    flat arguments need a gradient (none where autograd is off), and the flat arguments."""
    flat = BOUNDARIES[name].flatten(*args)
    grad = torch.is_grad_enabled()
    return (backend, [grad and isinstance(arg, torch.Tensor) and arg.requires_grad for arg in flat], *flat)


def call(name: str, backend: str, *args: Any) -> Any:
    """Op ``name`` on ``backend`` as its custom op: ``args`` as :mod:`any2point_fast.ops` takes them, the
    result as it returns it."""
    *outputs, _ = _OPS[name](*arguments(name, backend, *args))
    return BOUNDARIES[name].unpack(outputs)


__all__ = ["BOUNDARIES", "NAMESPACE", "Boundary", "arguments", "call", "custom_op"]
