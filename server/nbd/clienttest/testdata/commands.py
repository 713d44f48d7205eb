# Every transmission command and flag through libnbd, with structured replies
# on or off (NBD_SR=1/0). Layout written (the Go test checks the device):
#   [0, 64K)        pattern(64K, 1)
#   [64K, 68K)      0xaa written with FUA
#   [1M, 2M)        written then trimmed: hole
#   [2M, 3M)        written then zeroed without NO_HOLE: reads zero
#   [3M, 4M)        written then zeroed with NO_HOLE: reads zero, allocated
#   [5M, 5M+8K)     0x11, then 4K zeroed with FAST_ZERO
sr = os.environ["NBD_SR"] == "1"
h.set_request_structured_replies(sr)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(URI)
check(h.get_structured_replies_negotiated() == sr, "structured replies negotiated != %s" % sr)
check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION) == sr,
      "base:allocation negotiated without structured replies, or missing with them")
check(not h.is_read_only(), "export is read-only")
for name in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache"):
    check(getattr(h, name)(), name + " is false")
check(h.can_df() == sr, "can_df must follow structured replies")
size = h.get_size()

# READ and WRITE.
data = pattern(64 * 1024, 1)
h.pwrite(data, 0)
check(h.pread(len(data), 0) == data, "read back differs")
check(h.pread(4096, 8 * MiB) == bytes(4096), "never-written range is not zero")
# Unaligned.
h.pwrite(b"xyz", 1000001)
check(h.pread(5, 1000000) == b"\0xyz\0", "unaligned read-back differs")
# The largest request the server advertises.
big = 32 * MiB if size >= 32 * MiB else size
check(len(h.pread(big, 0)) == big, "max-size read")

# FUA and FLUSH.
h.pwrite(b"\xaa" * 4096, 64 * 1024, nbd.CMD_FLAG_FUA)
h.flush()
check(h.pread(4096, 64 * 1024) == b"\xaa" * 4096, "FUA write lost")

# TRIM then block status shows a hole.
h.pwrite(b"\x55" * MiB, MiB)
if sr:
    check(state_at(h, MiB) & nbd.STATE_HOLE == 0, "written range reported as hole")
h.trim(MiB, MiB)
got = h.pread(MiB, MiB)
check(got in (bytes(MiB), b"\x55" * MiB), "trimmed range reads neither zero nor old data")
if sr:
    ext = extents(h, MiB, MiB)
    check(all(f & nbd.STATE_HOLE for _, f in ext), "trimmed range not a hole: %r" % ext)
h.trim(4096, 9 * MiB, nbd.CMD_FLAG_FUA)

# WRITE_ZEROES without NO_HOLE.
h.pwrite(b"\x66" * MiB, 2 * MiB)
h.zero(MiB, 2 * MiB)
check(h.pread(MiB, 2 * MiB) == bytes(MiB), "zeroed range is not zero")
if sr:
    check(state_at(h, 2 * MiB) & nbd.STATE_ZERO, "zeroed range not reported zero")

# WRITE_ZEROES with NO_HOLE: zero and still allocated.
h.pwrite(b"\x77" * MiB, 3 * MiB)
h.zero(MiB, 3 * MiB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
check(h.pread(MiB, 3 * MiB) == bytes(MiB), "NO_HOLE zeroed range is not zero")
# The memory device keeps NO_HOLE ranges allocated (NBD_FLAT_DEVICE=1); other
# servers may report a zeroed allocated range as a hole.
if sr and os.environ.get("NBD_FLAT_DEVICE") == "1":
    check(state_at(h, 3 * MiB) & nbd.STATE_HOLE == 0, "NO_HOLE zero left a hole")

# WRITE_ZEROES with FAST_ZERO (memory zeroes fast).
h.pwrite(b"\x11" * 8192, 5 * MiB)
h.zero(4096, 5 * MiB, nbd.CMD_FLAG_FAST_ZERO)
check(h.pread(8192, 5 * MiB) == bytes(4096) + b"\x11" * 4096, "FAST_ZERO result")

# BLOCK_STATUS, whole export and REQ_ONE.
if sr:
    ext = extents(h, size, 0)
    check(ext[0][1] & nbd.STATE_HOLE == 0, "data at 0 reported as hole")
    one = extents(h, 4 * MiB, 0, nbd.CMD_FLAG_REQ_ONE)
    check(len(one) == 1, "REQ_ONE returned %d extents" % len(one))
    check(one[0][0] <= 4 * MiB, "REQ_ONE extent longer than request")
    tail = extents(h, 4096, size - 4096)
    check(sum(n for n, _ in tail) == 4096 and tail[0][1] & nbd.STATE_HOLE,
          "last block status %r" % tail)

# READ with DF: one data chunk.
if sr:
    chunks = []

    def chunk(buf, offset, status, err):
        chunks.append((offset, status, len(buf)))
        return 0

    buf = h.pread_structured(64 * 1024, 0, chunk, nbd.CMD_FLAG_DF)
    check(buf == data, "DF read differs")
    check(chunks == [(0, nbd.READ_DATA, 64 * 1024)], "DF read chunks %r" % chunks)

# CACHE.
h.cache(MiB, 0)

# Many requests in flight at once, completed in any order.
cookies = []
bufs = []
for i in range(64):
    b = nbd.Buffer(4096)
    bufs.append(b)
    cookies.append(h.aio_pread(b, 6 * MiB + i * 4096))
for i in range(64):
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(pattern(4096, i))), 7 * MiB + i * 4096)
while h.aio_in_flight() > 0:
    h.poll(-1)
for i in range(64):
    check(h.pread(4096, 7 * MiB + i * 4096) == pattern(4096, i), "aio write %d" % i)

h.flush()
h.shutdown()
print("OK")
