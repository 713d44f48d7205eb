# Option negotiation driven by hand: LIST, INFO (unknown and known names),
# LIST_META_CONTEXT, GO after a failed GO. NBD_EXPORTS is "name=description;..."
# and NBD_EXPORT the one to open, NBD_SIZE its size.
want = dict(e.split("=", 1) for e in os.environ["NBD_EXPORTS"].split(";"))
name = os.environ["NBD_EXPORT"]
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_uri(URI)
check(h.aio_is_negotiating(), "not negotiating in opt mode")
check(h.get_protocol() == "newstyle-fixed", "protocol %s" % h.get_protocol())
check(h.get_structured_replies_negotiated(), "structured replies refused")

listed = {}


def on_export(n, d):
    listed[n] = d
    return 0


check(h.opt_list(on_export) == len(want), "opt_list count")
check(listed == want, "opt_list %r, want %r" % (listed, want))

h.set_export_name("no-such-export")
try:
    h.opt_info()
except nbd.Error as e:
    pass
else:
    raise AssertionError("INFO of an unknown export succeeded")
check(h.aio_is_negotiating(), "negotiation ended after an unknown INFO")
try:
    h.opt_go()
except nbd.Error:
    pass
else:
    raise AssertionError("GO of an unknown export succeeded")
check(h.aio_is_negotiating(), "negotiation ended after an unknown GO")

h.set_export_name(name)
h.opt_info()
check(h.get_size() == int(os.environ["NBD_SIZE"]), "INFO size %d" % h.get_size())
check(h.get_export_description() == want[name], "INFO description %r" % h.get_export_description())
check(h.get_canonical_export_name() == name, "INFO name %r" % h.get_canonical_export_name())
check(h.get_block_size(nbd.SIZE_MINIMUM) in (1, 512), "minimum block size %d" % h.get_block_size(nbd.SIZE_MINIMUM))
check(h.get_block_size(nbd.SIZE_PREFERRED) == 4096, "preferred block size %d" % h.get_block_size(nbd.SIZE_PREFERRED))
check(h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB, "maximum block size %d" % h.get_block_size(nbd.SIZE_MAXIMUM))

contexts = []
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.add_meta_context("lupool:no-such-context")
h.opt_list_meta_context(lambda c: contexts.append(c) or 0)
check(contexts == [nbd.CONTEXT_BASE_ALLOCATION], "meta contexts %r" % contexts)

h.opt_go()
check(h.aio_is_ready(), "not ready after GO")
check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation not set by GO")
check(not h.can_meta_context("lupool:no-such-context"), "an unknown context was selected")
check(h.pread(4096, 0) is not None, "read after GO")
h.shutdown()
print("OK")
