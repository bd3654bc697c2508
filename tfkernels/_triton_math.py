"""Triton device functions shared by several kernels."""

from ._dispatch import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    # Below |u| = 1/4, tanh uses its Taylor polynomial (terms to u^11; the next is under float32's half
    # ulp there), where 1 - exp(-2|u|) would lose up to 2 bits to cancellation (an absolute error of
    # ~1e-7 that a soft cap c multiplies by c).
    _TANH_SMALL = tl.constexpr(0.25)

    @triton.jit
    def tanh(u):
        """float32 tanh within about an ulp: odd, +-1 at +-inf, NaN for NaN. Triton's only tanh is
        libdevice's, which its interpreter lacks: a Taylor polynomial for small |u|, else
        (1 - t) / (1 + t) with t = exp(-2|u|) (-> +-1, no overflow, at any |u|)."""
        a = tl.abs(u)
        t = tl.exp(-2.0 * a)
        large = (1.0 - t) / (1.0 + t)
        u2 = a * a
        small = a * (1.0 + u2 * (-0.3333333333333333 + u2 * (0.13333333333333333 + u2 * (
            -0.05396825396825397 + u2 * (0.021869488536155203 + u2 * -0.008863235529902197)))))
        magnitude = tl.where(a < _TANH_SMALL, small, large)
        return tl.where(u < 0, -magnitude, magnitude)
