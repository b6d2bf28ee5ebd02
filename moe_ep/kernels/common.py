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
    for block in range(start, end, BLOCK):
        # Declared on pointers computed here, as in transport.primitives._row (an argument's
        # declaration is lost when the function is inlined).
        src = src_ptr + block
        dst = dst_ptr + block
        if ALIGNED:
            src = tl.multiple_of(src, 16)
            dst = tl.multiple_of(dst, 16)
        offs = tl.arange(0, BLOCK)
        mask = offs < end - block
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)
