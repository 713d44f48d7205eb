# A read-only export: reads work, every mutation fails with EPERM (strict
# mode off, so libnbd sends them instead of refusing locally).
h.set_strict_mode(0)
h.connect_uri(URI)
check(h.is_read_only(), "read-only export not advertised read-only")
check(h.pread(4096, 0) == bytes(4096), "read on read-only export")
expect_errno(errno.EPERM, "write", h.pwrite, b"x" * 4096, 0)
expect_errno(errno.EPERM, "FUA write", h.pwrite, b"x" * 4096, 0, nbd.CMD_FLAG_FUA)
expect_errno(errno.EPERM, "trim", h.trim, 4096, 0)
expect_errno(errno.EPERM, "zero", h.zero, 4096, 0)
check(h.pread(4096, 0) == bytes(4096), "read after refused writes")
h.flush()
h.shutdown()
print("OK")
