package mqtt

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/rawconn"
	"github.com/bastion-iot/bastion/internal/ratelog"
)

// tlsListener is the broker's only listener. It does the TLS handshake
// itself, before the broker sees the connection, so that the handshake has
// a deadline, and a refused handshake (plaintext MQTT on the TLS port, no
// client certificate) is counted in a metric and gets a clear log line
// (one per kind per 10 s: Server.refusalLine).
type tlsListener struct {
	s    *Server
	id   string
	addr string
	cfg  *tls.Config

	ln     net.Listener
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// limit holds the connections not authenticated yet (the TLS
	// handshake, then the wait for CONNECT and its check): admit.
	limit *bridges.SourceLimit[net.Conn]
	// Refusals and evictions are logged once a minute (under mu).
	mu          sync.Mutex
	limitLogged time.Time
	refusedN    int
	// closed is set by Close before it waits for wg, and Serve starts no
	// connection's goroutine once it is set (both under mu): a
	// connection accepted just before Close closed the listener reached
	// wg.Add after Close's wg.Wait had started, which WaitGroup forbids,
	// and its goroutine ran on after Close returned.
	closed bool

	// accepted, if set (tests only), runs in Serve after a connection is
	// accepted and admitted.
	accepted func()
}

// unauthSlot is one unauthenticated connection's place (admit); its
// Value is the connection, which an eviction closes.
type unauthSlot = bridges.Slot[net.Conn]

// admit takes a slot for connection c from src among the unauthenticated
// connections: l.limit, a bridges.SourceLimit (why it counts per address,
// per IPv6 /64 and in all, refusing past the first and evicting the
// oldest past the others, is said there), bounded by MaxUnauthPerSource,
// MaxUnauthPerPrefix and MaxUnauth. Each holds a goroutine and TLS state
// for up to HandshakeTimeout twice over (the handshake, then CONNECT).
// TCP cannot be spoofed, so an address over its bound is the host itself,
// refused at once: one host must not hold thousands (a slowloris). An
// evicted connection is closed. What the evictions push out is idle
// connections (TCP connected, no TLS): a device holds its slot only
// through its handshake and CONNECT, milliseconds (a secret login: the
// length of its check).
func (l *tlsListener) admit(c net.Conn, src bridges.Source) (*unauthSlot, bool) {
	slot := bridges.NewSlot(src, c)
	ok, evicted, by := l.limit.Take(slot)
	if !ok {
		l.limited(c, src, "connection refused: too many not yet authenticated from this address (TLS handshake or CONNECT pending)")
		return nil, false
	}
	// Closed: its goroutine's handshake or CONNECT read fails, and is not
	// counted again (evicted: handle, Server.accept).
	switch by {
	case bridges.BoundPrefix:
		l.limited(evicted.Value(), evicted.Source(), "oldest unauthenticated connection of this IPv6 /64 closed: too many not yet authenticated from the /64")
	case bridges.BoundTotal:
		l.limited(evicted.Value(), evicted.Source(), "oldest unauthenticated connection closed: too many not yet authenticated in all")
	}
	return slot, true
}

// limited counts a connection closed by the limits (c, from src) and logs
// at most once a minute: a flood would fill the log.
func (l *tlsListener) limited(c net.Conn, src bridges.Source, msg string) {
	// Counted before it is closed: whoever sees it closed sees it counted.
	l.s.m.Refused.WithLabelValues(hub.MQTT, hub.ReasonHandshakeLimit).Inc()
	c.Close()
	perSource, perPrefix, all := l.limit.From(src.Addr), l.limit.In(src.Prefix), l.limit.Len()
	l.mu.Lock()
	l.refusedN++
	n := l.refusedN
	logNow := time.Since(l.limitLogged) >= time.Minute
	if logNow {
		l.limitLogged, l.refusedN = time.Now(), 0
	}
	l.mu.Unlock()
	if !logNow {
		return
	}
	args := []any{"device", "", "remote", c.RemoteAddr().String(), "closed_since_last_line", n,
		"from_this_address", perSource, "per_address_limit", l.s.cfg.MaxUnauthPerSource}
	if src.Prefix.IsValid() {
		args = append(args, "prefix", src.Prefix.String(), "from_this_prefix", perPrefix, "per_prefix_limit", l.s.cfg.MaxUnauthPerPrefix)
	}
	l.s.log.Warn("mqtt: "+msg, append(args, "in_all", all, "limit", l.s.cfg.MaxUnauth)...)
}

var _ listeners.Listener = (*tlsListener)(nil)

func (l *tlsListener) ID() string       { return l.id }
func (l *tlsListener) Protocol() string { return "tcp+tls" }

func (l *tlsListener) Address() string {
	if l.ln != nil {
		return l.ln.Addr().String()
	}
	return l.addr
}

// Init binds the port (called by AddListener, so clashes show up in New).
func (l *tlsListener) Init(*slog.Logger) error {
	ln, err := net.Listen("tcp", l.addr)
	if err != nil {
		return err
	}
	l.ln = ln
	l.ctx, l.cancel = context.WithCancel(context.Background())
	return nil
}

// Serve accepts until Close.
func (l *tlsListener) Serve(establish listeners.EstablishFn) {
	for {
		c, err := l.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			l.s.log.Error("mqtt: accept failed", "err", err)
			select {
			case <-l.ctx.Done():
				return
			case <-time.After(100 * time.Millisecond): // EMFILE: do not spin
			}
			continue
		}
		slot, ok := l.admit(c, bridges.SourceOf(c.RemoteAddr()))
		if !ok {
			continue
		}
		if l.accepted != nil {
			l.accepted()
		}
		l.mu.Lock()
		closed := l.closed
		if !closed {
			l.wg.Add(1)
		}
		l.mu.Unlock()
		if closed {
			l.limit.Release(slot)
			c.Close()
			l.s.log.Debug("mqtt: connection closed: the listener is closing", "device", "", "remote", c.RemoteAddr().String())
			continue
		}
		go func() {
			defer l.wg.Done()
			l.handle(c, slot, establish)
		}()
	}
}

func (l *tlsListener) handle(c net.Conn, slot *unauthSlot, establish listeners.EstablishFn) {
	ctx, cancel := context.WithTimeout(l.ctx, l.s.cfg.HandshakeTimeout)
	tc := tls.Server(rawconn.Wrap(c), l.cfg)
	err := tc.HandshakeContext(ctx)
	cancel()
	if err != nil {
		if l.limit.Release(slot) {
			// Closed by admit, which counted and logged it
			// (handshake_limit): not a failed handshake too.
			l.s.log.Debug("mqtt: TLS handshake ended: closed to make room for a newer connection", "device", "", "remote", c.RemoteAddr().String())
		} else {
			l.refused(c, err)
		}
		c.Close()
		return
	}
	// CONNECT must follow within the same bound; the broker then applies
	// the keepalive.
	c.SetReadDeadline(time.Now().Add(l.s.cfg.HandshakeTimeout))
	// mochi reads and writes through pipeConn so that PUBACKs can wait for
	// the queue's fsync without stopping the session's reads.
	pc := newPipeConn(tc, l)
	pc.unauth = slot
	defer pc.authenticated() // the slot, if the session never got that far
	if !l.firstPacketFits(c, pc) {
		c.Close()
		return
	}
	if err := establish(l.id, pc); err != nil {
		l.s.log.Debug("mqtt: client session ended", "remote", c.RemoteAddr().String(), "err", err)
	}
	l.s.unregister(pc)
	// mochi closed it already (Client.Stop); closing here too ends the
	// pipeline before this goroutine releases l.wg, whatever mochi did,
	// so that no flusher starts after it (pipeConn.reported).
	pc.Close()
}

// firstPacketFits reads the fixed header of the connection's first packet
// (its CONNECT) for mochi (pipeConn.Read hands it on) and reports whether
// the packet is within Server.connectLimit; if not, it counts and logs
// the refusal. mochi allocates a packet's whole body as soon as it has
// read its fixed header, bounded only by MaxPacketSize (up to 16 MiB):
// before any credential is checked (with secret logins allowed, without a
// certificate), each of the MaxUnauth connections could make it allocate
// that much. Here, in the listener that holds those connections, rather
// than in a hook (mochi calls none before it has read the whole packet)
// or a patch of mochi's reader (a policy of the gateway's in a copy of
// mochi's code). A header that could not be read (the connection closed
// or the CONNECT deadline passed) is not counted: mochi's read would
// have failed the same way, uncounted.
func (l *tlsListener) firstPacketFits(c net.Conn, pc *pipeConn) bool {
	hdr, size, err := readFixedHeader(pc.Conn, &pc.hdr)
	if err != nil {
		l.s.log.Debug("mqtt: connection ended before its first packet", "device", "", "remote", c.RemoteAddr().String(), "err", err)
		return false
	}
	if size > l.s.connectLimit {
		l.s.m.Refused.WithLabelValues(hub.MQTT, hub.ReasonConnectTooLarge).Inc()
		l.s.refusalLine(slog.LevelWarn, hub.ReasonConnectTooLarge, "mqtt: connection closed: its first packet is larger than a CONNECT may be; send a smaller Will payload",
			"device", "", "remote", c.RemoteAddr().String(), "size", size, "limit", l.s.connectLimit)
		return false
	}
	pc.first = hdr
	return true
}

// maxFixedHeader is the longest MQTT fixed header: a byte of type and
// flags, and a remaining length of up to four bytes.
const maxFixedHeader = 5

// errMalformedLength: a remaining length longer than four bytes.
var errMalformedLength = errors.New("malformed fixed header: remaining length longer than 4 bytes")

// readFixedHeader reads a packet's fixed header from r into buf and
// returns its bytes and the remaining length they give (the packet's size
// after them). It reads one byte at a time, so nothing after the header
// is taken from r. Type and flags are left to mochi.
func readFixedHeader(r io.Reader, buf *[maxFixedHeader]byte) (hdr []byte, remaining int, err error) {
	if _, err := io.ReadFull(r, buf[:1]); err != nil {
		return nil, 0, err
	}
	for i, shift := 1, 0; i < len(buf); i, shift = i+1, shift+7 {
		if _, err := io.ReadFull(r, buf[i:i+1]); err != nil {
			return nil, 0, err
		}
		remaining |= int(buf[i]&0x7f) << shift
		if buf[i]&0x80 == 0 {
			return buf[:i+1], remaining, nil
		}
	}
	return nil, 0, errMalformedLength
}

// refused counts connection c, whose TLS handshake failed with err, under
// why, and logs it through refusalLine: anyone who reaches the port can
// open connections that fail so, as fast as they can. A handshake that
// Close ended is not counted: stopping is no failure of the client's.
func (l *tlsListener) refused(c net.Conn, err error) {
	remote := c.RemoteAddr().String()
	var rh tls.RecordHeaderError
	var cr *certRefused
	switch {
	case errors.As(err, &cr):
		// counted and logged by the certificate check
	case errors.As(err, &rh):
		what := "not TLS"
		if len(rh.RecordHeader) > 0 && rh.RecordHeader[0]>>4 == 1 {
			what = "plaintext MQTT CONNECT"
		}
		l.s.m.Refused.WithLabelValues(hub.MQTT, hub.ReasonPlaintext).Inc()
		l.s.refusalLine(slog.LevelWarn, hub.ReasonPlaintext, "mqtt: connection refused: plaintext on the TLS port; connect with mqtts (TLS) and a client certificate",
			"device", "", "remote", remote, "saw", what, "first_bytes", fmt.Sprintf("%x", rh.RecordHeader[:]))
	case isNoClientCert(err):
		l.s.m.Refused.WithLabelValues(hub.MQTT, hub.ReasonNoCredentials).Inc()
		l.s.refusalLine(slog.LevelWarn, hub.ReasonNoCredentials, "mqtt: handshake refused: no client certificate", "device", "", "remote", remote)
	case l.ctx.Err() != nil:
		// Ended by Close (its context cancelled, the connection closed):
		// the server is stopping, the client did nothing wrong.
		l.s.log.Debug("mqtt: TLS handshake ended: the server is stopping", "device", "", "remote", remote)
	default:
		l.s.m.Handshakes.WithLabelValues(hub.MQTT, "failed").Inc()
		l.s.refusalLine(slog.LevelInfo, "handshake_failed", "mqtt: TLS handshake failed", "device", "", "remote", remote, "err", ratelog.ClipErr(err))
	}
}

func isNoClientCert(err error) bool {
	// crypto/tls has no sentinel for it.
	return err != nil && strings.Contains(err.Error(), "client didn't provide a certificate")
}

// Close stops accepting, ends handshakes in progress and closes the
// broker's clients of this listener.
func (l *tlsListener) Close(closeClients listeners.CloseFn) {
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
	l.cancel()
	l.ln.Close()
	// A connection past its TLS handshake but before its CONNECT is not
	// among the broker's clients yet: closeClients does not end it, and
	// its goroutine would hold wg until the CONNECT deadline (10 s).
	for _, c := range l.limit.Values() {
		c.Close()
	}
	// Ended here, all at once and each within endWait, mochi's
	// closeClients finds them closed: it would write each DISCONNECT in
	// turn, waiting on every device that stopped reading. Those in
	// Server.conns too: a connection accepted in its CONNECT but not yet
	// in mochi's Clients (closeClients does not see it either) would get
	// its CONNACK after this and hold wg until its keepalive ran out; one
	// still in its credential check is in the unauthenticated list above
	// until it is accepted, and registered before that (conns is read
	// after that list, so no connection slips between the two). Ended
	// here, mochi does not set its session up (patch (13)).
	clients := l.s.mq.Clients.GetByListener(l.id)
	seen := make(map[*mochi.Client]bool, len(clients))
	for _, cl := range clients {
		seen[cl] = true
	}
	l.s.mu.Lock()
	for _, pcs := range l.s.conns {
		for _, pc := range pcs {
			if !seen[pc.cl] {
				clients = append(clients, pc.cl)
			}
		}
	}
	l.s.mu.Unlock()
	var ending sync.WaitGroup
	deadline := time.Now().Add(endWait)
	for _, cl := range clients {
		if !cl.Closed() {
			ending.Go(func() { l.s.endSession(cl, packets.ErrServerShuttingDown, deadline) })
		}
	}
	ending.Wait()
	closeClients(l.id)
	l.wg.Wait()
}
