"""Device helpers shared by kernel families (no kernels here)."""

import triton
import triton.language as tl


@triton.jit
def _copy_span(src_ptr, dst_ptr, count, part, PARTS, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Copy part ``part`` of ``PARTS`` of the ``count`` contiguous elements at ``src_ptr`` to
    ``dst_ptr`` (parts are contiguous and BLOCK-aligned); 16-byte aligned ends when ALIGNED."""
    per_part = tl.cdiv(tl.cdiv(count, PARTS), BLOCK) * BLOCK
    start = part * per_part
    end = tl.minimum(start + per_part, count)
    if ALIGNED:
        src_ptr = tl.multiple_of(src_ptr, 16)
        dst_ptr = tl.multiple_of(dst_ptr, 16)
    for block in range(start, end, BLOCK):
        offs = block + tl.arange(0, BLOCK)
        mask = offs < end
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)
