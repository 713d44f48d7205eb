package nbdkernel

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/internal/realclient"
	"github.com/lupool/lupool/server/nbd"
	"github.com/lupool/lupool/server/nbdproto"
)

// startEngine serves exports with the real engine on 127.0.0.1:0.
func startEngine(t *testing.T, mode nbd.TLSMode, cfg *tls.Config, exports ...nbd.Export) string {
	t.Helper()
	es := nbd.NewExportSet()
	for _, e := range exports {
		if err := es.Add(e); err != nil {
			t.Fatal(err)
		}
	}
	srv, err := nbd.NewServer(nbd.Options{Exports: es, TLSMode: mode, TLSConfig: cfg})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		if err := <-done; !errors.Is(err, nbd.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	return l.Addr().String()
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestNegotiateWithEngine(t *testing.T) {
	rw := blockdevtest.NewMem(12<<20, blockdev.Caps{})
	ro := blockdevtest.NewMem(1<<20, blockdev.Caps{ReadOnly: true, MultiConn: true})
	addr := startEngine(t, nbd.TLSOff, nil,
		nbd.Export{Name: "rw", ID: "n1@7", Device: rw}, nbd.Export{Name: "ro", Device: ro})
	ctx := context.Background()

	c, info, err := Negotiate(ctx, dial(t, addr), "rw", nil)
	if err != nil {
		t.Fatalf("Negotiate: %v", err)
	}
	if info.SizeBytes != 12<<20 || info.ExportName || info.LUID != "n1@7" {
		t.Errorf("info %+v, want 12 MiB with LU id n1@7 over NBD_OPT_GO", info)
	}
	want := nbdproto.TxFlagHasFlags | nbdproto.TxFlagSendFlush | nbdproto.TxFlagSendFUA | nbdproto.TxFlagSendTrim | nbdproto.TxFlagSendWriteZeroes
	if info.TransmissionFlags&want != want || info.TransmissionFlags&nbdproto.TxFlagReadOnly != 0 {
		t.Errorf("flags %#x, want %#x set and not read-only", info.TransmissionFlags, want)
	}
	if info.PreferredBlockBytes != 4096 || info.MaximumBlockBytes != 32<<20 {
		t.Errorf("block sizes %+v", info)
	}
	if got := chooseBlockSize(info); got != 4096 {
		t.Errorf("block size for the kernel %d, want 4096", got)
	}
	// The connection is in the transmission phase with simple replies, as
	// the kernel expects: a READ gets a simple reply and the data.
	if err := rw.WriteAt(ctx, []byte("kernel"), 4096, 0); err != nil {
		t.Fatal(err)
	}
	req := make([]byte, nbdproto.RequestSize)
	nbdproto.PutRequest(req, nbdproto.Request{Type: nbdproto.CmdRead, Handle: 7, Offset: 4096, Length: 6})
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	reply := make([]byte, nbdproto.SimpleReplySize+6)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, reply); err != nil {
		t.Fatal(err)
	}
	if r, err := nbdproto.ParseSimpleReply(reply); err != nil || r.Handle != 7 || r.Error != 0 || string(reply[16:]) != "kernel" {
		t.Errorf("reply %+v %v %q", r, err, reply[16:])
	}

	_, info, err = Negotiate(ctx, dial(t, addr), "ro", nil)
	if err != nil {
		t.Fatal(err)
	}
	if info.LUID != "" {
		t.Errorf("LU id %q for an export without one", info.LUID)
	}
	if info.TransmissionFlags&(nbdproto.TxFlagReadOnly|nbdproto.TxFlagCanMultiConn) != nbdproto.TxFlagReadOnly|nbdproto.TxFlagCanMultiConn {
		t.Errorf("read-only multi-conn export flags %#x", info.TransmissionFlags)
	}

	if _, _, err := Negotiate(ctx, dial(t, addr), "nosuch", nil); !errors.Is(err, ErrUnknownExport) {
		t.Errorf("unknown export: %v, want ErrUnknownExport", err)
	}
}

func TestNegotiateTLS(t *testing.T) {
	serverCfg, pool := testCert(t)
	dev := blockdevtest.NewMem(1<<20, blockdev.Caps{})
	addr := startEngine(t, nbd.TLSRequired, serverCfg, nbd.Export{Name: "mem", Device: dev})
	ctx := context.Background()

	if _, _, err := Negotiate(ctx, dial(t, addr), "mem", nil); !errors.Is(err, ErrTLSRequired) {
		t.Errorf("plain client on a TLS-required server: %v, want ErrTLSRequired", err)
	}
	c, info, err := Negotiate(ctx, dial(t, addr), "mem", &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
	if err != nil {
		t.Fatalf("Negotiate with TLS: %v", err)
	}
	if _, ok := c.(*tls.Conn); !ok || info.SizeBytes != 1<<20 {
		t.Errorf("conn %T info %+v, want a TLS connection to a 1 MiB export", c, info)
	}
	if _, _, err := Negotiate(ctx, dial(t, addr), "mem", &tls.Config{RootCAs: x509.NewCertPool(), ServerName: "127.0.0.1"}); err == nil {
		t.Error("TLS handshake succeeded with an untrusted server certificate")
	}
}

// testCert returns a server config with a self-signed certificate for
// 127.0.0.1 and a pool trusting it.
func testCert(t *testing.T) (*tls.Config, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}, pool
}

// fakeServer runs script on the server side of a pipe and returns the
// client side.
func fakeServer(t *testing.T, script func(c net.Conn)) net.Conn {
	t.Helper()
	client, server := net.Pipe()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer server.Close()
		script(server)
	}()
	t.Cleanup(func() { client.Close(); wg.Wait() })
	return client
}

func greeting(flags uint16) []byte {
	b := make([]byte, nbdproto.GreetingSize)
	nbdproto.PutGreeting(b, flags)
	return b
}

func optReply(option, typ uint32, payload []byte) []byte {
	b := make([]byte, nbdproto.OptionReplyHeaderSize)
	nbdproto.PutOptionReply(b, nbdproto.OptionReply{Option: option, Type: typ, Length: uint32(len(payload))})
	return append(b, payload...)
}

// readOption reads one option from the client.
func readOption(c net.Conn) (nbdproto.OptionHeader, []byte, error) {
	var h [nbdproto.OptionHeaderSize]byte
	if _, err := io.ReadFull(c, h[:]); err != nil {
		return nbdproto.OptionHeader{}, nil, err
	}
	oh, err := nbdproto.ParseOptionHeader(h[:])
	if err != nil {
		return oh, nil, err
	}
	p := make([]byte, oh.Length)
	_, err = io.ReadFull(c, p)
	return oh, p, err
}

func TestNegotiateExportNameFallback(t *testing.T) {
	for _, noZeroes := range []bool{false, true} {
		flags := nbdproto.FlagFixedNewstyle
		if noZeroes {
			flags |= nbdproto.FlagNoZeroes
		}
		var gotName string
		c := fakeServer(t, func(s net.Conn) {
			s.Write(greeting(flags))
			var cf [4]byte
			io.ReadFull(s, cf[:])
			if oh, _, err := readOption(s); err != nil || oh.Option != nbdproto.OptGo {
				return
			}
			s.Write(optReply(nbdproto.OptGo, nbdproto.RepErrUnsup, nil))
			oh, p, err := readOption(s)
			if err != nil || oh.Option != nbdproto.OptExportName {
				return
			}
			gotName = string(p)
			reply := binary.BigEndian.AppendUint64(nil, 5<<20)
			reply = binary.BigEndian.AppendUint16(reply, nbdproto.TxFlagHasFlags|nbdproto.TxFlagSendFlush)
			if binary.BigEndian.Uint32(cf[:])&nbdproto.ClientFlagNoZeroes == 0 {
				reply = append(reply, make([]byte, nbdproto.ExportNameZeroPadSize)...)
			}
			s.Write(reply)
			// Stay open until the client is done, as a real server does
			// (net.Pipe fails SetDeadline once the peer has closed).
			io.Copy(io.Discard, s)
		})
		_, info, err := Negotiate(context.Background(), c, "legacy", nil)
		if err != nil {
			t.Fatalf("noZeroes=%v: %v", noZeroes, err)
		}
		if !info.ExportName || info.SizeBytes != 5<<20 || info.TransmissionFlags != nbdproto.TxFlagHasFlags|nbdproto.TxFlagSendFlush {
			t.Errorf("noZeroes=%v: info %+v", noZeroes, info)
		}
		c.Close()
		if gotName != "legacy" {
			t.Errorf("EXPORT_NAME sent %q", gotName)
		}
	}
}

func TestNegotiateProtocolErrors(t *testing.T) {
	cases := map[string]func(s net.Conn){
		"bad magic": func(s net.Conn) { s.Write([]byte("HTTP/1.1 400 Bad Request\r\n\r\n")) },
		"not fixed newstyle": func(s net.Conn) {
			s.Write(greeting(0))
		},
		"huge reply": func(s net.Conn) {
			s.Write(greeting(nbdproto.FlagFixedNewstyle))
			io.ReadFull(s, make([]byte, 4))
			readOption(s)
			b := make([]byte, nbdproto.OptionReplyHeaderSize)
			nbdproto.PutOptionReply(b, nbdproto.OptionReply{Option: nbdproto.OptGo, Type: nbdproto.RepInfo, Length: 1 << 30})
			s.Write(b)
		},
		"ack without export info": func(s net.Conn) {
			s.Write(greeting(nbdproto.FlagFixedNewstyle))
			io.ReadFull(s, make([]byte, 4))
			readOption(s)
			s.Write(optReply(nbdproto.OptGo, nbdproto.RepAck, nil))
		},
		"reply to another option": func(s net.Conn) {
			s.Write(greeting(nbdproto.FlagFixedNewstyle))
			io.ReadFull(s, make([]byte, 4))
			readOption(s)
			s.Write(optReply(nbdproto.OptList, nbdproto.RepAck, nil))
		},
	}
	for name, script := range cases {
		t.Run(name, func(t *testing.T) {
			c := fakeServer(t, script)
			_, _, err := Negotiate(context.Background(), c, "x", nil)
			if !errors.Is(err, ErrProtocol) {
				t.Errorf("err %v, want ErrProtocol", err)
			}
		})
	}
	t.Run("refused with message", func(t *testing.T) {
		c := fakeServer(t, func(s net.Conn) {
			s.Write(greeting(nbdproto.FlagFixedNewstyle))
			io.ReadFull(s, make([]byte, 4))
			readOption(s)
			s.Write(optReply(nbdproto.OptGo, nbdproto.RepErrPolicy, []byte("go away\x00\n")))
		})
		_, _, err := Negotiate(context.Background(), c, "x", nil)
		if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "go away") {
			t.Errorf("err %v, want ErrRefused with the server's message", err)
		}
	})
	t.Run("context cancelled", func(t *testing.T) {
		c := fakeServer(t, func(s net.Conn) { io.Copy(io.Discard, s) }) // never greets
		ctx, cancel := context.WithCancel(context.Background())
		time.AfterFunc(50*time.Millisecond, cancel)
		start := time.Now()
		_, _, err := Negotiate(ctx, c, "x", nil)
		if !errors.Is(err, context.Canceled) || time.Since(start) > 5*time.Second {
			t.Errorf("err %v after %v, want context.Canceled promptly", err, time.Since(start))
		}
	})
}

func TestCheckAvailable(t *testing.T) {
	noModule := t.TempDir()
	withModule := t.TempDir()
	if err := os.Mkdir(withModule+"/nbd", 0o755); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		h      host
		device string
		want   error
	}{
		{"not an nbd path", host{noModule, 0}, "/dev/sda", ErrInvalidOptions},
		{"partition", host{noModule, 0}, "/dev/nbd0p1", ErrInvalidOptions},
		{"no number", host{noModule, 0}, "/dev/nbd", ErrInvalidOptions},
		{"relative", host{noModule, 0}, "nbd0", ErrInvalidOptions},
		{"module not loaded", host{noModule, 0}, "/dev/nbd0", ErrModuleNotLoaded},
		{"not root", host{withModule, 1000}, "/dev/nbd0", ErrNotRoot},
		{"no device node", host{withModule, 0}, "/dev/nbd987654", ErrNoDevice},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if err := c.h.check(c.device); !errors.Is(err, c.want) {
				t.Errorf("check(%q) = %v, want %v", c.device, err, c.want)
			}
		})
	}
	if !strings.Contains(ErrModuleNotLoaded.Error(), "modprobe nbd") || !strings.Contains(ErrModuleNotLoaded.Error(), "nbd-client") {
		t.Errorf("ErrModuleNotLoaded does not say what to do: %v", ErrModuleNotLoaded)
	}
	// This machine: whatever it has, the answer is one of the documented ones.
	err := CheckAvailable("/dev/nbd0")
	if _, statErr := os.Stat("/sys/module/nbd"); os.IsNotExist(statErr) {
		if !errors.Is(err, ErrModuleNotLoaded) {
			t.Errorf("CheckAvailable without the module: %v, want ErrModuleNotLoaded", err)
		}
	} else if err != nil && !errors.Is(err, ErrNotRoot) && !errors.Is(err, ErrNoDevice) {
		t.Errorf("CheckAvailable: %v", err)
	}
}

func TestAttachArguments(t *testing.T) {
	ctx := context.Background()
	for _, o := range []Options{
		{Device: "/dev/nbd0"},
		{Addr: "127.0.0.1:1", Device: ""},
		{Addr: "127.0.0.1:1", Device: "/dev/vda"},
		{Addr: "127.0.0.1:1", Device: "/dev/nbd0", Export: strings.Repeat("x", 5000)},
		{Addr: "127.0.0.1:1", Device: "/dev/nbd0", IOTimeout: -time.Second},
		{Addr: "127.0.0.1:1", Device: "/dev/nbd0", IOTimeout: time.Second, NoIOTimeout: true},
		{Dial: func(context.Context) (net.Conn, error) { return nil, nil }, Device: "/dev/sda"},
	} {
		if err := Attach(ctx, o); !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("Attach(%+v) = %v, want ErrInvalidOptions", o, err)
		}
	}
	// Without the module, Attach says so before dialling (port 1 would
	// refuse, which would be a different error).
	if _, err := os.Stat("/sys/module/nbd"); os.IsNotExist(err) {
		err := Attach(ctx, Options{Addr: "127.0.0.1:1", Device: "/dev/nbd0"})
		if !errors.Is(err, ErrModuleNotLoaded) {
			t.Errorf("Attach without the module: %v, want ErrModuleNotLoaded", err)
		}
	}
}

func TestChooseBlockSize(t *testing.T) {
	cases := []struct {
		info ExportInfo
		want uint32
	}{
		{ExportInfo{SizeBytes: 1 << 30, PreferredBlockBytes: 4096}, 4096},
		{ExportInfo{SizeBytes: 1 << 30}, 4096},
		{ExportInfo{SizeBytes: 1 << 30, PreferredBlockBytes: 1 << 20}, 4096},
		{ExportInfo{SizeBytes: 1 << 30, PreferredBlockBytes: 1024}, 1024},
		{ExportInfo{SizeBytes: 4096*10 + 512}, 512},
		{ExportInfo{SizeBytes: 4096*10 + 1024}, 1024},
		{ExportInfo{SizeBytes: 4096*10 + 1024, MinimumBlockBytes: 2048}, 2048},
		{ExportInfo{SizeBytes: 1000}, 512},
	}
	for _, c := range cases {
		if got := chooseBlockSize(c.info); got != c.want {
			t.Errorf("chooseBlockSize(%+v) = %d, want %d", c.info, got, c.want)
		}
	}
}

// fakeDevice records ioctls; NBD_DO_IT blocks until NBD_DISCONNECT or
// doItReturns is closed.
type fakeDevice struct {
	mu struct {
		sync.Mutex
		calls []string // guarded by mu
	}
	failOn       uint
	disconnected chan struct{}
	doItReturns  chan struct{}
	closed       bool
}

var _ kernelDevice = (*fakeDevice)(nil)

func (d *fakeDevice) ioctl(req uint, arg uintptr) error {
	d.mu.Lock()
	name := ioctlName(req)
	if req != nbdSetSock {
		name += "(" + strconv.FormatUint(uint64(arg), 10) + ")"
	}
	d.mu.calls = append(d.mu.calls, name)
	d.mu.Unlock()
	if req == d.failOn {
		return errors.New("fake ioctl failure")
	}
	switch req {
	case nbdDisconnect:
		close(d.disconnected)
	case nbdDoIt:
		select {
		case <-d.disconnected:
			return errDetached
		case <-d.doItReturns:
		}
	}
	return nil
}

func (d *fakeDevice) Close() error { d.closed = true; return nil }

func (d *fakeDevice) calls() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.mu.calls...)
}

func fakePlatform(t *testing.T, dev *fakeDevice) platform {
	return platform{
		check: func(string) error { return nil },
		open:  func(string) (kernelDevice, error) { return dev, nil },
		socket: func(c net.Conn, _ *slog.Logger) (*os.File, func(), error) {
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			return r, func() { r.Close(); w.Close() }, nil
		},
	}
}

func TestAttachSequence(t *testing.T) {
	dev := blockdevtest.NewMem(8<<20, blockdev.Caps{})
	addr := startEngine(t, nbd.TLSOff, nil, nbd.Export{Name: "mem", Device: dev})
	opts := Options{Addr: addr, Export: "mem", Device: "/dev/nbd3", IOTimeout: 1500 * time.Millisecond}

	t.Run("cancelled", func(t *testing.T) {
		fd := &fakeDevice{disconnected: make(chan struct{}), doItReturns: make(chan struct{})}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- attach(ctx, opts, fakePlatform(t, fd)) }()
		deadline := time.Now().Add(5 * time.Second)
		for !strings.Contains(strings.Join(fd.calls(), " "), "NBD_DO_IT") {
			if time.Now().After(deadline) {
				t.Fatalf("NBD_DO_IT never called; calls %v", fd.calls())
			}
			time.Sleep(5 * time.Millisecond)
		}
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("attach = %v, want context.Canceled", err)
		}
		flags := int(nbdproto.TxFlagHasFlags | nbdproto.TxFlagSendFlush | nbdproto.TxFlagSendFUA)
		got := strings.Join(fd.calls(), " ")
		want := "NBD_CLEAR_SOCK(0) NBD_SET_BLKSIZE(4096) NBD_SET_SIZE_BLOCKS(2048) NBD_SET_FLAGS("
		if !strings.HasPrefix(got, want) {
			t.Fatalf("ioctls %s, want prefix %s", got, want)
		}
		wantTail := "NBD_SET_TIMEOUT(2) NBD_SET_SOCK NBD_DO_IT(0) NBD_DISCONNECT(0) NBD_CLEAR_QUE(0) NBD_CLEAR_SOCK(0)"
		if !strings.HasSuffix(got, wantTail) {
			t.Errorf("ioctls %s, want suffix %s", got, wantTail)
		}
		var setFlags int
		for _, c := range fd.calls() {
			if v, ok := strings.CutPrefix(c, "NBD_SET_FLAGS("); ok {
				setFlags, _ = strconv.Atoi(strings.TrimSuffix(v, ")"))
			}
		}
		if setFlags&flags != flags {
			t.Errorf("NBD_SET_FLAGS(%#x), want the export's flags %#x included", setFlags, flags)
		}
		if !fd.closed {
			t.Error("device not closed")
		}
	})
	t.Run("server went away", func(t *testing.T) {
		fd := &fakeDevice{disconnected: make(chan struct{}), doItReturns: make(chan struct{})}
		close(fd.doItReturns)
		if err := attach(context.Background(), opts, fakePlatform(t, fd)); err != nil {
			t.Errorf("attach = %v, want nil after the kernel detached", err)
		}
	})
	t.Run("ioctl fails", func(t *testing.T) {
		fd := &fakeDevice{disconnected: make(chan struct{}), doItReturns: make(chan struct{}), failOn: nbdSetSizeBlocks}
		err := attach(context.Background(), opts, fakePlatform(t, fd))
		if err == nil || !strings.Contains(err.Error(), "NBD_SET_SIZE_BLOCKS") {
			t.Errorf("attach = %v, want an NBD_SET_SIZE_BLOCKS error", err)
		}
		calls := fd.calls()
		if calls[len(calls)-1] != "NBD_CLEAR_SOCK(0)" {
			t.Errorf("after a failed ioctl: %v, want a final NBD_CLEAR_SOCK", calls)
		}
	})
	t.Run("socket pair without request timeout", func(t *testing.T) {
		// lupool attach LU /dev/nbdX: Dial gives the kernel's end of a
		// socket pair whose other end a server serves; the kernel gets a
		// request timeout of 0 (it never fails a request).
		kernelEnd, serverEnd, err := SocketPair()
		if errors.Is(err, ErrUnsupported) {
			t.Skip(err)
		}
		if err != nil {
			t.Fatal(err)
		}
		es := nbd.NewExportSet()
		if err := es.Add(nbd.Export{Name: "mem", Device: dev}); err != nil {
			t.Fatal(err)
		}
		srv, err := nbd.NewServer(nbd.Options{Exports: es})
		if err != nil {
			t.Fatal(err)
		}
		go func() { _ = srv.Serve(&oneConn{c: serverEnd}) }()
		defer func() { _ = srv.Shutdown(context.Background()) }()
		fd := &fakeDevice{disconnected: make(chan struct{}), doItReturns: make(chan struct{})}
		close(fd.doItReturns)
		o := Options{Export: "mem", Device: "/dev/nbd3", NoIOTimeout: true,
			Dial: func(context.Context) (net.Conn, error) { return kernelEnd, nil }}
		if err := attach(context.Background(), o, fakePlatform(t, fd)); err != nil {
			t.Fatalf("attach = %v", err)
		}
		if got := strings.Join(fd.calls(), " "); !strings.Contains(got, "NBD_SET_TIMEOUT(0) NBD_SET_SOCK") {
			t.Errorf("ioctls %s, want NBD_SET_TIMEOUT(0)", got)
		}
	})
	t.Run("unknown export", func(t *testing.T) {
		fd := &fakeDevice{disconnected: make(chan struct{}), doItReturns: make(chan struct{})}
		o := opts
		o.Export = "nosuch"
		if err := attach(context.Background(), o, fakePlatform(t, fd)); !errors.Is(err, ErrUnknownExport) {
			t.Errorf("attach = %v, want ErrUnknownExport", err)
		}
		if len(fd.calls()) != 0 {
			t.Errorf("ioctls %v issued for an unknown export", fd.calls())
		}
	})
}

// TestNegotiateWithNbdkit checks the handshake against an independent
// server, nbdkit's memory plugin.
func TestNegotiateWithNbdkit(t *testing.T) {
	nbdkit := realclient.LookPath(t, "nbdkit")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_, port, _ := net.SplitHostPort(addr)
	l.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, nbdkit, "-f", "-i", "127.0.0.1", "-p", port, "memory", "3M")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); _ = cmd.Wait() })
	var c net.Conn
	for deadline := time.Now().Add(10 * time.Second); ; {
		if c, err = net.Dial("tcp", addr); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("nbdkit did not listen on %s: %v", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	defer c.Close()
	_, info, err := Negotiate(ctx, c, "", nil)
	if err != nil {
		t.Fatalf("Negotiate with nbdkit: %v", err)
	}
	if info.SizeBytes != 3<<20 || info.TransmissionFlags&nbdproto.TxFlagHasFlags == 0 || info.ExportName {
		t.Errorf("nbdkit export: %+v", info)
	}
}

// oneConn is a listener that accepts c once, then blocks until closed.
type oneConn struct {
	c    net.Conn
	once sync.Once
	done chan struct{}
	mu   sync.Mutex
}

func (l *oneConn) Accept() (net.Conn, error) {
	l.mu.Lock()
	if l.done == nil {
		l.done = make(chan struct{})
	}
	c, done := l.c, l.done
	l.c = nil
	l.mu.Unlock()
	if c != nil {
		return c, nil
	}
	<-done
	return nil, net.ErrClosed
}

func (l *oneConn) Close() error {
	l.mu.Lock()
	if l.done == nil {
		l.done = make(chan struct{})
	}
	l.mu.Unlock()
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *oneConn) Addr() net.Addr { return &net.UnixAddr{Name: "socketpair", Net: "unix"} }
