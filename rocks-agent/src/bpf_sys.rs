//! The few `bpf(2)` commands aya 0.14 does not wrap: replacing a link's program
//! (`BPF_LINK_UPDATE`), detaching a link (`BPF_LINK_DETACH`), a link's cgroup, a program's tag
//! by id, and the raw loads the kernel feature probe needs.
//!
//! Each command gets a `#[repr(C)]` struct holding only the leading fields of `union bpf_attr`
//! that it uses; the kernel accepts a shorter attr and zero-fills the rest.
use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use aya_obj::generated::{bpf_attach_type, bpf_cmd, bpf_prog_type};

fn sys_bpf<T>(cmd: bpf_cmd, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a live, fully initialized repr(C) prefix of `union bpf_attr` for `cmd`,
    // and its size is passed along so the kernel reads no further.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned_fd(rc: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this new fd to us and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

fn raw(fd: BorrowedFd<'_>) -> u32 {
    fd.as_raw_fd() as u32
}

#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Atomically replaces the program behind a link: the hook never runs without a program.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: raw(link),
        new_prog_fd: raw(new_prog),
        flags: 0,
        old_prog_fd: 0,
    };
    sys_bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
}

#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// Detaches a link from its hook now, whoever else still holds it (Linux 5.9+).
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr { link_fd: raw(link) };
    sys_bpf(bpf_cmd::BPF_LINK_DETACH, &mut attr).map(drop)
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn obj_info<T>(fd: BorrowedFd<'_>, info: &mut T) -> io::Result<()> {
    let mut attr = InfoAttr {
        bpf_fd: raw(fd),
        info_len: size_of::<T>() as u32,
        info: std::ptr::from_mut(info) as u64,
    };
    sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}

/// The leading fields of `struct bpf_link_info` for a cgroup link.
#[repr(C)]
#[derive(Default)]
struct RawLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _pad2: u32,
}

/// What a cgroup link is: its id, the program it runs, the cgroup it is attached to (0 once
/// that cgroup was removed) and the hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub id: u32,
    pub prog_id: u32,
    pub cgroup_id: u64,
    pub attach_type: u32,
}

pub fn cgroup_link_info(link: BorrowedFd<'_>) -> io::Result<CgroupLinkInfo> {
    let mut info = RawLinkInfo::default();
    obj_info(link, &mut info)?;
    Ok(CgroupLinkInfo {
        id: info.id,
        prog_id: info.prog_id,
        cgroup_id: info.cgroup_id,
        attach_type: info.attach_type,
    })
}

#[repr(C)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// The leading fields of `struct bpf_prog_info`.
#[repr(C)]
#[derive(Default)]
struct RawProgInfo {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
}

/// The tag (a hash of the instructions, map references excluded) of the loaded program `id`:
/// equal tags mean the same code.
pub fn prog_tag_by_id(id: u32) -> io::Result<[u8; 8]> {
    let mut attr = GetFdByIdAttr {
        id,
        next_id: 0,
        open_flags: 0,
    };
    let fd = owned_fd(sys_bpf(bpf_cmd::BPF_PROG_GET_FD_BY_ID, &mut attr)?);
    prog_tag(std::os::fd::AsFd::as_fd(&fd))
}

pub fn prog_tag(prog: BorrowedFd<'_>) -> io::Result<[u8; 8]> {
    let mut info = RawProgInfo::default();
    obj_info(prog, &mut info)?;
    Ok(info.tag)
}

#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// Loads `r0 = 1; exit` as a program of `prog_type` for `attach_type`. The kernel refuses an
/// attach type it does not know for the program type with EINVAL, so this probes hooks such as
/// the getpeername ones (5.8) that a program-type probe cannot tell apart.
pub fn load_trivial(prog_type: bpf_prog_type, attach_type: bpf_attach_type) -> io::Result<OwnedFd> {
    // struct bpf_insn { u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm; }:
    // BPF_ALU64 | BPF_MOV | BPF_K with dst r0 and imm 1, then BPF_JMP | BPF_EXIT.
    let one = 1i32.to_ne_bytes();
    let insns: [[u8; 8]; 2] = [
        [0xb7, 0, 0, 0, one[0], one[1], one[2], one[3]],
        [0x95, 0, 0, 0, 0, 0, 0, 0],
    ];
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type: prog_type as u32,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: *b"rocks_probe\0\0\0\0\0",
        prog_ifindex: 0,
        expected_attach_type: attach_type as u32,
    };
    sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr).map(owned_fd)
}

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// Whether `BPF_LINK_CREATE` exists for cgroup hooks (5.7), without attaching anything: a
/// cgroup target that is not a cgroup fails with EBADF where the command exists, EINVAL where
/// it does not.
pub fn cgroup_links_supported(prog: BorrowedFd<'_>, attach_type: bpf_attach_type) -> bool {
    let mut attr = LinkCreateAttr {
        prog_fd: raw(prog),
        target_fd: u32::MAX,
        attach_type: attach_type as u32,
        flags: 0,
    };
    match sys_bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr) {
        Ok(rc) => {
            drop(owned_fd(rc));
            true
        }
        Err(e) => e.raw_os_error() == Some(libc::EBADF),
    }
}

/// Attaches `prog` to `cgroup` through a new BPF link. No flags: the kernel refuses attach
/// flags on cgroup links and always runs linked programs next to the others (multi mode).
pub fn link_create_cgroup(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: bpf_attach_type,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: raw(prog),
        target_fd: raw(cgroup),
        attach_type: attach_type as u32,
        flags: 0,
    };
    sys_bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).map(owned_fd)
}

#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn c_path(path: &std::path::Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Pins a BPF object (here: a link) at `path` on bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &std::path::Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: raw(fd),
        file_flags: 0,
    };
    sys_bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Opens the BPF object pinned at `path`.
pub fn obj_get(path: &std::path::Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    sys_bpf(bpf_cmd::BPF_OBJ_GET, &mut attr).map(owned_fd)
}

/// Whether the bpf command `cmd`, whose attr starts with an fd, exists: given a bad fd (and
/// nothing else, the kernel wants unused attr fields zero) it fails with EBADF, while an
/// unknown command fails with EINVAL.
pub fn command_exists(cmd: bpf_cmd) -> bool {
    let mut attr = LinkDetachAttr { link_fd: u32::MAX };
    match sys_bpf(cmd, &mut attr) {
        Ok(_) => true,
        Err(e) => e.raw_os_error() == Some(libc::EBADF),
    }
}
