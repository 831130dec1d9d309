"""The suite's streaming-read kernel: reads a buffer once, writes one float per program."""
import triton
import triton.language as tl

BLOCK, ITERS = 2048, 16


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    base = pid.to(tl.int64) * BLOCK * ITERS
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def stream_read(x, out):
    """Read every element of the flat tensor x; out holds one partial sum per program."""
    _read_kernel[(stream_read.grid(x.numel()),)](x, out, x.numel(), BLOCK=BLOCK, ITERS=ITERS)


stream_read.grid = lambda n: triton.cdiv(n, BLOCK * ITERS)
