"""The default seccomp profile of container sandboxes: allow everything except a deny-list.

Why a deny-list and not Docker's allow-list: it is short enough to review, accepted by crun and runc alike,
and blocks the calls that matter for escaping or harming the host (mounting, module loading, kexec, tracing
other processes, new user namespaces, keyrings, bpf, perf, clock changes) even where a capability check would
already refuse them. Denied calls fail with EPERM like Docker's, so programs see an ordinary permission error;
clone3 fails with ENOSYS so libcs fall back to clone, whose namespace flags can then be filtered.
"""

from __future__ import annotations

EPERM = 1
ENOSYS = 38
CLONE_NEWUSER = 0x10000000

DENIED_SYSCALLS = [
    # filesystems and mounts
    "mount", "umount", "umount2", "pivot_root",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "open_by_handle_at", "name_to_handle_at", "quotactl", "quotactl_fd", "swapon", "swapoff",
    # kernel, modules, reboot
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "create_module",
    "reboot", "acct", "syslog", "sysfs", "_sysctl", "uselib", "lookup_dcookie", "nfsservctl", "vhangup",
    "iopl", "ioperm", "vm86", "vm86old", "get_kernel_syms", "query_module",
    # other processes, namespaces
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "setns", "unshare",
    # keyrings, bpf, perf, userfaultfd
    "add_key", "request_key", "keyctl", "bpf", "perf_event_open", "userfaultfd",
    # clocks
    "settimeofday", "stime", "clock_settime", "clock_settime64", "clock_adjtime", "clock_adjtime64", "adjtimex",
    # memory policy across the host
    "move_pages", "mbind", "set_mempolicy", "migrate_pages",
]


def default_profile() -> dict:
    """The `linux.seccomp` section of config.json."""
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": list(DENIED_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": EPERM,
                # clone(flags, ...) with CLONE_NEWUSER set: a new user namespace regains every capability
                "args": [{"index": 0, "value": CLONE_NEWUSER, "valueTwo": CLONE_NEWUSER, "op": "SCMP_CMP_MASKED_EQ"}],
            },
        ],
    }
