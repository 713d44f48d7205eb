# The legacy NBD_OPT_EXPORT_NAME path: libnbd uses it when the fixed-newstyle
# handshake flag is off. NBD_HSFLAGS picks whether NO_ZEROES is offered (the
# server must then omit, or else send, the 124 zero bytes).
flags = int(os.environ["NBD_HSFLAGS"])
h.set_handshake_flags(flags)
h.connect_uri(URI)
check(h.get_protocol() == "newstyle", "protocol %s, want newstyle" % h.get_protocol())
check(h.get_size() == int(os.environ["NBD_SIZE"]), "size %d" % h.get_size())
check(not h.get_structured_replies_negotiated(), "structured replies without options")
data = pattern(8192, 5)
h.pwrite(data, 4096, nbd.CMD_FLAG_FUA)
check(h.pread(8192, 4096) == data, "read back over EXPORT_NAME")
h.flush()
h.shutdown()

# An unknown export over EXPORT_NAME: the server can only close.
h2 = nbd.NBD()
h2.set_handshake_flags(flags)
h2.set_export_name("no-such-export")
try:
    h2.connect_uri(URI.rsplit("/", 1)[0] + "/no-such-export")
except nbd.Error:
    pass
else:
    raise AssertionError("EXPORT_NAME of an unknown export connected")
print("OK")
