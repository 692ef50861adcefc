"""Spreading new connections evenly over the workers, and only over the ready ones.

Workers that share one listening socket race for each new connection, and the kernel
picks the winner by who wakes first: on a quiet machine one worker wins streaks of dozens
of connections, a 64-connection keep-alive burst can split 50/14, and a respawned worker
can sit idle for 100 ms while its warm sibling takes everything (measured with
`bench/run.py`; see the README). Node's cluster answers this by accepting in the primary
and handing connections out round-robin, which puts the primary in every connection's
path.

hello-cluster instead gives every worker slot its own socket in one SO_REUSEPORT group
and attaches a classic BPF program to the group that picks, for each new connection, one
of the slots that has a ready worker, at random. The kernel runs the program on the SYN;
the master never touches a connection. When a worker dies or starts draining, the master
rewrites the program (one setsockopt) so that no new connection is sent to its socket;
the master keeps every slot's socket open, so what was already queued there waits for the
replacement instead of being reset.

Classic BPF (SO_ATTACH_REUSEPORT_CBPF) needs no privilege, unlike eBPF.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence

SO_ATTACH_REUSEPORT_CBPF = 51  # <asm-generic/socket.h>; Python's socket module lacks it

# The classic BPF opcodes used here (<linux/filter.h>, <linux/bpf_common.h>).
LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
ALU_MOD_K = 0x04 | 0x90 | 0x00  # BPF_ALU | BPF_MOD | BPF_K
JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
RET_K = 0x06 | 0x00  # BPF_RET | BPF_K
RET_A = 0x06 | 0x10  # BPF_RET | BPF_A: return the accumulator
SKF_AD_RANDOM = (-0x1000 + 56) & 0xFFFFFFFF  # SKF_AD_OFF + SKF_AD_RANDOM: a random u32
NO_SOCKET = 0xFFFFFFFF  # out of range: the kernel falls back to its own hash
BPF_MAXINSNS = 4096  # the kernel's cap on a classic BPF program's length
# A chain for k ready slots of a larger group is 2k + 3 instructions, so the cap allows
# (4096 - 3) // 2 = 2046 slots: far above config.MAX_WORKERS (512).
MAX_STEERED = (BPF_MAXINSNS - 3) // 2

Instruction = tuple[int, int, int, int]  # code, jt, jf, k (struct sock_filter)


def program(indices: Sequence[int]) -> list[Instruction]:
    """A cBPF program returning one of `indices` (positions in the group) at random.

    Pure, so its shape is unit-tested. With no index (no worker ready) it returns an
    out-of-range index, and the kernel spreads connections over the whole group by hash:
    they queue on the sockets until workers come, as they would on one shared socket.
    The kernel runs it on every SYN: three instructions when the ready slots are 0..k-1,
    else a chain of 2k + 3 (about a microsecond for k = 512).
    """
    if not indices:
        return [(RET_K, 0, 0, NO_SOCKET)]
    if list(indices) == list(range(len(indices))):
        # Slots 0..k-1 (the steady state, every worker ready): the random number modulo k
        # is the index itself, three instructions whatever the pool size.
        return [(LD_W_ABS, 0, 0, SKF_AD_RANDOM), (ALU_MOD_K, 0, 0, len(indices)),
                (RET_A, 0, 0, 0)]
    if len(indices) > MAX_STEERED:
        raise ValueError(f"{len(indices)} slots exceed the {MAX_STEERED} a cBPF program steers")
    code: list[Instruction] = [(LD_W_ABS, 0, 0, SKF_AD_RANDOM), (ALU_MOD_K, 0, 0, len(indices))]
    for position, index in enumerate(indices):
        code += [(JEQ_K, 0, 1, position), (RET_K, 0, 0, index)]
    code.append((RET_K, 0, 0, indices[0]))  # unreachable: A % n < n
    return code


def attach(sock: socket.socket, code: Sequence[Instruction]) -> None:
    """Install `code` as the program of the SO_REUSEPORT group `sock` belongs to."""
    buffer = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in code))
    fprog = struct.pack("HP", len(code), ctypes.addressof(buffer))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
