# Invalid requests sent on purpose (strict mode off): each gets the NBD error
# the spec recommends, and the connection stays usable after every one.
sr = os.environ.get("NBD_SR", "1") == "1"
h.set_request_structured_replies(sr)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.set_strict_mode(0)
h.connect_uri(URI)
size = h.get_size()
good = pattern(4096, 3)
h.pwrite(good, 0)


def still_usable(what):
    check(h.pread(4096, 0) == good, "connection unusable after " + what)


# The spec: ENOSPC for writes (and write-zeroes) past the end, EINVAL for
# reads, trims and everything else.
E = errno
cases = [
    ("read starting at the end", E.EINVAL, h.pread, 4096, size),
    ("read straddling the end", E.EINVAL, h.pread, 8192, size - 4096),
    ("read with offset+length overflow", E.EINVAL, h.pread, 4096, 2**64 - 2048),
    ("write straddling the end", E.ENOSPC, h.pwrite, b"w" * 8192, size - 4096),
    ("write past the end", E.ENOSPC, h.pwrite, b"w" * 512, size + 4096),
    ("trim straddling the end", E.EINVAL, h.trim, 8192, size - 4096),
    ("zero straddling the end", E.ENOSPC, h.zero, 8192, size - 4096),
    ("cache past the end", E.EINVAL, h.cache, 8192, size - 4096),
    ("read with an unknown flag", E.EINVAL, h.pread, 4096, 0, 1 << 12),
    ("write with an unknown flag", E.EINVAL, h.pwrite, b"u" * 512, 0, 1 << 12),
    ("flush with an unknown flag", E.EINVAL, h.flush, 1 << 12),
    ("trim with an unknown flag", E.EINVAL, h.trim, 4096, 0, 1 << 12),
    ("zero with an unknown flag", E.EINVAL, h.zero, 4096, 0, 1 << 12),
]
if sr:
    cases += [
        ("block status past the end", E.EINVAL, h.block_status, 4096, size,
         lambda *a: 0),
    ]
# Run every case and report all mismatches together.
failures = []
for what, want, fn, *args in cases:
    try:
        expect_errno(want, what, fn, *args)
    except AssertionError as e:
        failures.append(str(e))
    still_usable(what)

# FUA is valid on every command once SEND_FUA is negotiated: the server
# MUST accept it, even by ignoring it (proto.md, "Command flags").
accepted = [
    ("read with FUA", h.pread, 4096, 0, nbd.CMD_FLAG_FUA),
    ("flush with FUA", h.flush, nbd.CMD_FLAG_FUA),
    ("cache with FUA", h.cache, 4096, 0, nbd.CMD_FLAG_FUA),
]
for what, fn, *args in accepted:
    try:
        fn(*args)
    except nbd.Error as e:
        failures.append("%s: refused: %s" % (what, e))
    still_usable(what)
check(not failures, "\n".join(failures))

check(h.pread(4096, 0) == good, "the failed writes changed data at 0")
check(h.pread(4096, size - 4096) == bytes(4096), "a failed write landed at the end")
h.flush()
h.shutdown()
print("OK")
