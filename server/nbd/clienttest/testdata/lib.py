# Shared helpers for the nbdsh scripts. The Go test runs nbdsh with -c, which
# execs this file and then one script in the same namespace, where nbdsh has
# already created the unconnected handle `h`. Every check raises on failure;
# a script ends by printing "OK".
import errno
import os

import nbd

URI = os.environ["NBD_URI"]
MiB = 1 << 20


def errname(e):
    """Name of an errno; libnbd's nbd.Error.errno is already a name in some
    versions and a number in others."""
    if isinstance(e, int):
        return errno.errorcode.get(e, str(e))
    return str(e)


def expect_errno(want, what, fn, *args):
    """Call fn(*args) and require an nbd.Error with errno want."""
    try:
        fn(*args)
    except nbd.Error as e:
        if errname(e.errno) != errname(want):
            raise AssertionError("%s: got errno %s (%s), want %s"
                                 % (what, errname(e.errno), e, errname(want)))
        return
    raise AssertionError("%s: succeeded, want %s" % (what, errname(want)))


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def extents(h, length, off, flags=0):
    """Return the base:allocation extents as (length, flags) pairs."""
    got = []

    def cb(metacontext, offset, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            check(offset == off, "block status offset %d, want %d" % (offset, off))
            got.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(length, off, cb, flags)
    check(len(got) > 0, "block status at %d returned no extents" % off)
    check(sum(n for n, _ in got) <= length or flags & nbd.CMD_FLAG_REQ_ONE == 0,
          "REQ_ONE extents exceed request")
    return got


def state_at(h, off, length=4096):
    """Return the base:allocation flags of the extent starting at off."""
    return extents(h, length, off, nbd.CMD_FLAG_REQ_ONE)[0][1]


def pattern(n, seed):
    return bytes((i * 7 + seed) % 251 for i in range(n))
