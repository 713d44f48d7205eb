# Multi-conn semantics (proto.md, NBD_FLAG_CAN_MULTI_CONN): once a write has
# completed on one connection and a FLUSH has completed on another, every
# connection to the export reads the new data. Three libnbd handles on the
# same export: h writes, h2 flushes, h3 reads; then the roles rotate, and
# trim and write-zeroes are checked the same way. NBD_SIZE is the export size.
size = int(os.environ["NBD_SIZE"])
hs = []
for _ in range(3):
    c = nbd.NBD()
    c.connect_uri(URI)
    check(c.can_multi_conn(), "CAN_MULTI_CONN not advertised")
    hs.append(c)
a, b, c = hs
n = 64
block = 4096
check(n * block * 3 <= size, "export too small for the script")


def drain(conn):
    while conn.aio_in_flight() > 0:
        conn.poll(-1)


def write_many(w, base, seed):
    # Many writes in flight on w while the reader has reads in flight on
    # another range: the connections run side by side.
    for i in range(n):
        w.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(pattern(block, seed + i))),
                     base + i * block)
    drain(w)


def check_all(r, base, seed, what):
    for i in range(n):
        got = r.pread(block, base + i * block)
        check(got == pattern(block, seed + i), "%s: block %d differs" % (what, i))


# 1. Written on a, flushed on b, read on c (and on b, and on a).
region = 0
write_many(a, region, 1)
b.flush()
for who, r in (("c", c), ("b", b), ("a", a)):
    check_all(r, region, 1, "write on a, flush on b, read on " + who)

# 2. Rotated: written on c while a reads another range, flushed on a, read on b.
region = n * block
for i in range(n):
    a.aio_pread(nbd.Buffer(block), 2 * n * block + i * block)
write_many(c, region, 100)
drain(a)
a.flush()
check_all(b, region, 100, "write on c, flush on a, read on b")

# 3. A FUA write on b is visible on a and c without any flush.
fua = b"\xa5" * block
b.pwrite(fua, 0, nbd.CMD_FLAG_FUA)
check(a.pread(block, 0) == fua and c.pread(block, 0) == fua, "FUA write on b not seen")

# 4. Trim and write-zeroes on one connection, flush on another: zeroes
# everywhere.
a.zero(block, region)
c.trim(block, region + block)
b.flush()
for who, r in (("a", a), ("b", b), ("c", c)):
    got = r.pread(2 * block, region)
    check(got[:block] == bytes(block), "zero on a not seen on " + who)
    check(got[block:] in (bytes(block), pattern(block, 101)),
          "trim on c: block reads neither zero nor old data on " + who)

for x in hs:
    x.shutdown()
print("OK")
