# Device errors (injected by the Go test) become NBD error replies, simple or
# structured (NBD_SR), and the connection keeps working. Faults:
#   read  [1M, 1M+64K)  -> blockdev.ErrIO        : EIO
#   write [2M, 2M+64K)  -> blockdev.ErrNoSpace   : ENOSPC
#   write [3M, 3M+64K)  -> wrapped syscall.ENOSPC: ENOSPC
#   trim  [4M, ...)     -> blockdev.ErrIO        : EIO
#   zero  [5M, ...)     -> blockdev.ErrNotSupported: ENOTSUP (FAST_ZERO)
#   read  [6M, ...)     -> blockdev.ErrShutdown  : ESHUTDOWN
#   flush when NBD_FAULT_FLUSH=1 -> blockdev.ErrIO: EIO
sr = os.environ["NBD_SR"] == "1"
h.set_request_structured_replies(sr)
h.connect_uri(URI)
good = pattern(4096, 9)
h.pwrite(good, 0)


def usable(what):
    check(h.pread(4096, 0) == good, "connection unusable after " + what)


expect_errno(errno.EIO, "read fault", h.pread, 64 * 1024, MiB)
usable("read fault")
# A read that only touches the faulty range in its middle still fails.
expect_errno(errno.EIO, "read spanning fault", h.pread, 2 * MiB, MiB - 4096)
usable("spanning read fault")
expect_errno(errno.ENOSPC, "write ErrNoSpace", h.pwrite, b"n" * 4096, 2 * MiB)
usable("write fault")
expect_errno(errno.ENOSPC, "write ENOSPC", h.pwrite, b"n" * 4096, 3 * MiB, nbd.CMD_FLAG_FUA)
usable("wrapped errno fault")
expect_errno(errno.EIO, "trim fault", h.trim, 4096, 4 * MiB)
usable("trim fault")
expect_errno(errno.ENOTSUP, "fast zero", h.zero, 4096, 5 * MiB, nbd.CMD_FLAG_FAST_ZERO)
usable("fast zero")
expect_errno(errno.ESHUTDOWN, "read on shutdown", h.pread, 4096, 6 * MiB)
usable("shutdown fault")
if os.environ.get("NBD_FAULT_FLUSH") == "1":
    expect_errno(errno.EIO, "flush fault", h.flush)
    usable("flush fault")
# Many failing and succeeding reads in flight together.
cookies = []
for i in range(32):
    off = MiB if i % 2 else 0
    cookies.append((i, h.aio_pread(nbd.Buffer(4096), off)))
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, c in cookies:
    try:
        h.aio_command_completed(c)
        check(i % 2 == 0, "faulty aio read %d succeeded" % i)
    except nbd.Error as e:
        check(i % 2 == 1 and errname(e.errno) == "EIO", "aio read %d: %s" % (i, e))
usable("aio faults")
h.shutdown()
print("OK")
