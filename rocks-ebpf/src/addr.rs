//! Reading and judging addresses as the kernel hands them to programs (network byte order).

/// Reads the four IPv6 words of a context field one at a time: the verifier refuses the
/// memcpy/memmove the compiler would otherwise emit for an array copy out of or into ctx.
#[inline(always)]
pub(crate) fn read_ip6(field: &[u32; 4]) -> [u32; 4] {
    // SAFETY: `field` points into the kernel-provided context.
    unsafe {
        [
            core::ptr::read_volatile(&field[0]),
            core::ptr::read_volatile(&field[1]),
            core::ptr::read_volatile(&field[2]),
            core::ptr::read_volatile(&field[3]),
        ]
    }
}

#[inline(always)]
pub(crate) fn write_ip6(field: &mut [u32; 4], value: [u32; 4]) {
    // SAFETY: `field` points into the kernel-provided context; see `read_ip6`.
    unsafe {
        core::ptr::write_volatile(&mut field[0], value[0]);
        core::ptr::write_volatile(&mut field[1], value[1]);
        core::ptr::write_volatile(&mut field[2], value[2]);
        core::ptr::write_volatile(&mut field[3], value[3]);
    }
}

#[inline(always)]
pub(crate) fn is_loopback4(addr_be: u32) -> bool {
    let addr = u32::from_be(addr_be);
    addr >> 24 == 127 || addr == 0
}

#[inline(always)]
pub(crate) fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == 0xffffu32.to_be()
}

#[inline(always)]
pub(crate) fn is_loopback6(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && (addr[3] == 1u32.to_be() || addr[3] == 0)
}
