package otacache

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/noresponse"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/mux"
	coapnet "github.com/plgd-dev/go-coap/v3/net"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/udp/coder"
)

// DTLSListener is what ServeDTLS accepts connections from: go-coap's
// coapnet.DTLSListener or a wrapper around it (bridges/coap limits
// handshakes per source).
type DTLSListener interface {
	AcceptWithContext(ctx context.Context) (net.Conn, error)
	Close() error
}

// DTLSHandlerFunc answers one CoAP request. It runs on the session's
// record reader (pion's goroutine for the connection), or with
// DTLSServeConfig.Inline on the listener's read loop: while it runs, the
// session (inline: every session of the listener) reads nothing else (a
// retransmission of the same request waits and is then answered from the
// response cache). A handler that must wait answers later instead
// (DTLSResponseWriter.Defer). w and r are valid until it returns (after
// Defer, until the deferred answer's Done).
type DTLSHandlerFunc func(w *DTLSResponseWriter, r *pool.Message)

// DTLSServeConfig configures ServeDTLS. Only Handler is required.
type DTLSServeConfig struct {
	Handler DTLSHandlerFunc
	// MaxMessageSize bounds a request body reassembled from Block1
	// blocks (default 64 KiB); a larger one gets 4.13 with Size1.
	MaxMessageSize uint32
	// BodyLimit, if set, is the largest request body the handler takes
	// on path (0, or over MaxMessageSize: MaxMessageSize). A Block1
	// transfer is refused (4.13, Size1 this limit) at the block that takes
	// it past the limit, or at its first block if the Size1 the client
	// announced does, instead of being reassembled up to MaxMessageSize
	// for the handler to refuse; the device learns the handler's limit,
	// not MaxMessageSize. It runs where Handler runs and must not block.
	BodyLimit func(c *DTLSConn, path string) uint32
	// OnTooLarge, if set, is told of every request ServeDTLS refuses for
	// its size itself (the caller logs and counts it): answered (4.13 with
	// Size1) for a Block1 transfer past its limit and for a confirmable
	// request over ReadBufferSize, not answered (dropped) for a
	// non-confirmable one over ReadBufferSize or a datagram over it that
	// does not decode (path ""). size is the body's bytes known so far (or
	// the datagram's, for one over ReadBufferSize). It runs where Handler
	// runs and must not block either.
	OnTooLarge func(c *DTLSConn, path string, size uint64, limit uint32, answered bool)
	// OnBadRequest, if set, is told of every message ServeDTLS refuses
	// itself as bad (the caller logs and counts it): one that does not
	// decode as CoAP (answer "RST" for a confirmable one whose header
	// reads, else "none": dropped), and a Block1 block with a bad Block1
	// option ("4.02"), out of order ("4.08") or shorter than its size
	// ("4.00"). why says what was wrong. It runs where Handler runs and
	// must not block either.
	OnBadRequest func(c *DTLSConn, path, answer, why string)
	// ReadBufferSize bounds one datagram's CoAP message (default 1472,
	// go-coap's MTU); a larger confirmable request gets 4.13 with Size1
	// (the body limit of its path) without being decoded further, anything
	// else larger is dropped.
	ReadBufferSize int
	// HandshakeTimeout bounds one DTLS handshake (default 10 s); it derives
	// from ctx, so shutdown ends handshakes too.
	HandshakeTimeout time.Duration
	// IdleTimeout closes a connection that sent nothing for this long
	// (default 1 min). OnIdle, if set, runs first (so the caller can log
	// it); the connection is closed after it either way.
	IdleTimeout time.Duration
	OnIdle      func(*DTLSConn)
	// OnNewConn runs after the handshake, before the first request is
	// read: the place to bind the connection to its device.
	OnNewConn func(*DTLSConn)
	// Errors receives connection errors (default: dropped).
	Errors func(error)
	// ResponseCacheEntries bounds each connection's cache of responses for
	// retransmitted requests (default 32; see ResponseCache).
	ResponseCacheEntries int
	// BlockwiseSZX is the largest Block2 size offered (default 1024).
	BlockwiseSZX blockwise.SZX
	// Inline, if set, is asked once per session, after OnNewConn: true
	// lets pion's listener run Handler for that session on its own read
	// loop (pion Conn.SetInlineReadHandler, third_party/README.md), which
	// saves a goroutine hand-off per request. Say true only for sessions
	// whose Handler never blocks: while it runs, no session of the
	// listener reads anything.
	Inline func(*DTLSConn) bool
	// CriticalOptions are the critical (odd-numbered) options Handler
	// processes, besides those ServeDTLS takes as processed itself: Block1
	// and Block2 (its own), Uri-Path (every handler routes on it), and
	// Uri-Host and Uri-Port (a listener serves one origin, whatever name
	// and port the client used to reach it). A request carrying any other
	// critical option, or one of these with a length outside its range,
	// never reaches Handler (RFC 7252 §5.4.1, §5.4.3): a confirmable one
	// gets 4.02 Bad Option naming the options, a non-confirmable one is
	// dropped. Otherwise the handler would answer as if the option were
	// not there, which is what "critical" forbids (a request with
	// If-Match or OSCORE handled as a plain one). Elective options are
	// never refused.
	CriticalOptions []message.OptionID
	// OnBadOption, if set, is told of every request refused for its
	// critical options (the caller logs and counts it). It runs where
	// Handler runs and must not block either.
	OnBadOption func(c *DTLSConn, confirmable bool, unrecognised []message.OptionID)
}

// ServeDTLS serves CoAP (RFC 7252) over DTLS sessions accepted from l.
// After its handshake a session has no goroutine of ours: pion's record
// reader decrypts a record and calls onRecord, which answers it inline
// and writes the answer (go-coap's server uses three more goroutines per
// session and passes every message across two of them). It keeps go-coap's message
// codec and the semantics its server gave us:
//
//   - a confirmable request is answered piggybacked (ACK, same message
//     ID), a non-confirmable one with a NON; an empty CON (ping) gets RST,
//     a malformed CON whose header parses gets RST, other malformed or
//     unexpected messages are dropped;
//   - duplicates (same message ID) are answered from a bounded response
//     cache (ResponseCacheEntries, see ResponseCache) without running the
//     handler again;
//   - Block2 (RFC 7959): a response body larger than the block size, or
//     any response to a request carrying Block2, is cut into the asked
//     block; the body is read only at that block's offset, so a transfer
//     resumes from any block with no server state;
//   - Block1: request bodies in blocks are reassembled (one transfer per
//     session at a time, bounded by MaxMessageSize, 2.31 Continue between
//     blocks, 4.08 for a block out of order, 4.13 + Size1 when too big);
//   - No-Response (RFC 7967) is honoured;
//   - a request with a critical option neither ServeDTLS nor the handler
//     processes (DTLSServeConfig.CriticalOptions) gets 4.02 Bad Option, or
//     is dropped if non-confirmable, before the handler runs (RFC 7252
//     §5.4.1; go-coap's server did the same);
//   - idle sessions are closed after IdleTimeout.
//
// It serves until ctx ends or l fails, then closes l and every session and
// waits for them to end. A nil error means ctx ended or l was closed.
func ServeDTLS(ctx context.Context, l DTLSListener, cfg DTLSServeConfig) error {
	if cfg.Handler == nil {
		return errors.New("serve dtls: no handler")
	}
	if cfg.MaxMessageSize == 0 {
		cfg.MaxMessageSize = 64 * 1024
	}
	if cfg.ReadBufferSize <= 0 {
		cfg.ReadBufferSize = 1472
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 10 * time.Second
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = time.Minute
	}
	if cfg.Errors == nil {
		cfg.Errors = func(error) {}
	}
	if cfg.ResponseCacheEntries <= 0 {
		cfg.ResponseCacheEntries = 32
	}
	if cfg.BlockwiseSZX == 0 || cfg.BlockwiseSZX > blockwise.SZX1024 {
		cfg.BlockwiseSZX = blockwise.SZX1024
	}
	return newDTLSServer(&cfg).serve(ctx, l)
}

func newDTLSServer(cfg *DTLSServeConfig) *dtlsServer {
	return &dtlsServer{cfg: cfg, conns: map[*DTLSConn]struct{}{}}
}

// maxAcceptors bounds the session goroutines that wait in Accept between
// sessions; one more is started whenever the last of them takes a
// connection, so there is always one waiting.
const maxAcceptors = 8

// serve runs the session goroutines (worker) until ctx ends or the
// listener fails. There is no accept loop of its own: a worker accepts
// the connection it then serves, so a new connection wakes one goroutine
// (the one blocked in Accept), not an accept loop and then a worker.
func (s *dtlsServer) serve(ctx context.Context, l DTLSListener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s.l, s.stop = l, cancel
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		<-ctx.Done()
		_ = l.Close()
	}()
	s.acceptors.Add(1)
	s.spawn(ctx, &wg)
	<-ctx.Done()
	s.closeAll()
	wg.Wait()
	s.sessions.Wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

func (s *dtlsServer) spawn(ctx context.Context, wg *sync.WaitGroup) {
	s.started.Add(1)
	wg.Add(1)
	go func() { defer wg.Done(); s.worker(ctx, wg) }()
}

// listenerClosed reports whether err says the listener was closed: by
// net (ErrClosed), by go-coap (ErrListenerIsClosed) or by pion/dtls's
// internal UDP listener, whose error value is not exported.
func listenerClosed(err error) bool {
	return errors.Is(err, net.ErrClosed) || errors.Is(err, coapnet.ErrListenerIsClosed) ||
		strings.HasSuffix(err.Error(), "udp: listener closed")
}

type dtlsServer struct {
	cfg  *DTLSServeConfig
	l    DTLSListener
	stop context.CancelFunc // ends serve
	mu   sync.Mutex
	err  error // the accept error serve returns
	// conns are the established sessions.
	conns  map[*DTLSConn]struct{}
	closed bool
	// sessions counts established sessions until their end has run.
	sessions sync.WaitGroup
	// acceptors counts the workers in (or on their way into) Accept.
	acceptors atomic.Int32
	started   atomic.Int64 // workers started (tests)
}

// worker accepts a connection and serves it (the handshake, then the
// session's setup), then accepts the next, until the listener fails or
// maxAcceptors others already wait. Before it serves, it makes sure
// another worker waits in Accept. A goroutine that has served a DTLS
// handshake has grown its stack to what a handshake needs; a new
// goroutine for every connection grows a small one again, copying it each
// time (runtime.copystack was 5 % of the gateway's CPU per PSK
// handshake). Until 2026-11-25 an accept loop handed each connection to a
// worker over a channel: two scheduler wake-ups per connection instead of
// one.
func (s *dtlsServer) worker(ctx context.Context, wg *sync.WaitGroup) {
	for {
		rw, err := s.l.AcceptWithContext(ctx)
		if err != nil {
			var ne net.Error
			if ctx.Err() == nil && !listenerClosed(err) && errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if ctx.Err() == nil && !listenerClosed(err) {
				s.mu.Lock()
				if s.err == nil {
					s.err = fmt.Errorf("serve dtls: accept: %w", err)
				}
				s.mu.Unlock()
			}
			s.acceptors.Add(-1)
			s.stop()
			return
		}
		if rw == nil {
			continue
		}
		if s.acceptors.Add(-1) == 0 {
			s.acceptors.Add(1)
			s.spawn(ctx, wg)
		}
		s.serveConn(ctx, rw)
		if ctx.Err() != nil || s.acceptors.Add(1) > maxAcceptors {
			s.acceptors.Add(-1)
			return
		}
	}
}

func (s *dtlsServer) add(c *DTLSConn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	s.sessions.Add(1)
	return true
}

func (s *dtlsServer) remove(c *DTLSConn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

func (s *dtlsServer) closeAll() {
	s.mu.Lock()
	s.closed = true
	list := make([]*DTLSConn, 0, len(s.conns))
	for c := range s.conns {
		list = append(list, c)
	}
	s.mu.Unlock()
	for _, c := range list {
		_ = c.Close()
	}
}

// DTLSConn is one DTLS session served by ServeDTLS.
type DTLSConn struct {
	nc     net.Conn
	ctx    context.Context
	cancel context.CancelFunc
	srv    *dtlsServer
	msgID  atomic.Uint32
	// cache is the session's response cache; cacheMu guards it, since a
	// deferred answer (DTLSResponseWriter.Defer) is stored from another
	// goroutine.
	cacheMu sync.Mutex
	cache   *ResponseCache

	// lastRead (Unix ns) is when the last record came; idle closes the
	// session IdleTimeout after it.
	lastRead atomic.Int64
	idle     *time.Timer

	closeOnce sync.Once
	endOnce   sync.Once
	mu        sync.Mutex
	onClose   []func()
	value     atomic.Value

	// Block1 reassembly, touched only by onRecord (never concurrent).
	b1Key  string
	b1Next int64
	b1Body []byte
}

// NetConn is the DTLS connection (a *dtls.Conn, or the listener's wrapper
// of one).
func (c *DTLSConn) NetConn() net.Conn { return c.nc }

// RemoteAddr is the peer's address.
func (c *DTLSConn) RemoteAddr() net.Addr { return c.nc.RemoteAddr() }

// Context ends when the session is closed or the server stops.
func (c *DTLSConn) Context() context.Context { return c.ctx }

// Close closes the DTLS session; its record reader then ends and runs the
// AddOnClose functions. Safe to call more than once, from anywhere.
func (c *DTLSConn) Close() error {
	var err error
	c.closeOnce.Do(func() { err = c.nc.Close() })
	return err
}

// SetValue keeps v with the session (typically set in OnNewConn: who the
// peer is), so handlers need no lookup per request.
func (c *DTLSConn) SetValue(v any) { c.value.Store(&v) }

// Value is what SetValue kept, or nil.
func (c *DTLSConn) Value() any {
	if p, ok := c.value.Load().(*any); ok {
		return *p
	}
	return nil
}

// AddOnClose registers f to run once the session has ended.
func (c *DTLSConn) AddOnClose(f func()) {
	c.mu.Lock()
	c.onClose = append(c.onClose, f)
	c.mu.Unlock()
}

// NextMessageID returns a message ID for a message the server starts (a
// notification).
func (c *DTLSConn) NextMessageID() uint16 { return uint16(c.msgID.Add(1)) }

// WriteMessage sends m (a notification) on the session. A NON or CON
// message without a message ID gets the next one. Safe for concurrent use
// with the session's own answers.
func (c *DTLSConn) WriteMessage(m *pool.Message) error {
	if m.MessageID() < 0 && (m.Type() == message.NonConfirmable || m.Type() == message.Confirmable) {
		m.SetMessageID(int32(c.NextMessageID()))
	}
	raw, err := m.MarshalWithEncoder(coder.DefaultCoder)
	if err != nil {
		return fmt.Errorf("encode coap message to %v: %w", c.RemoteAddr(), err)
	}
	if _, err := c.nc.Write(raw); err != nil {
		return fmt.Errorf("write coap message to %v: %w", c.RemoteAddr(), err)
	}
	return nil
}

// DTLSResponseWriter collects a handler's answer. It is a go-coap
// mux.ResponseWriter, so go-coap routers and Cache.ServeCoAP take it, but
// its Conn is nil: this server has no go-coap client connection (use
// Session).
type DTLSResponseWriter struct {
	conn *DTLSConn
	msg  *pool.Message
	noRe *uint32 // the request's No-Response value, if any
	set  bool

	// For Defer: the request, the Block1 option its answer carries, and
	// the deferred answer once Defer was called.
	req      *pool.Message
	extra    []message.Option
	deferred *DTLSDeferred
	after    func()
}

// AfterAnswer registers f to run once the answer has been sent (or was
// not: No-Response, an answer that cannot be encoded), on the goroutine
// that sent it, before the writer is released. An Observe registration
// uses it to hold its notifications until the registration answer is on
// the wire. Call it from the handler, at most once.
func (w *DTLSResponseWriter) AfterAnswer(f func()) { w.after = f }

// answered runs the AfterAnswer function, if any.
func (w *DTLSResponseWriter) answered() {
	if f := w.after; f != nil {
		w.after = nil
		f()
	}
}

// Defer tells the server that the handler answers later, from another
// goroutine: the handler returns at once (so that its session, or with
// DTLSServeConfig.Inline every session of the listener, reads on while
// the answer waits, e.g. for the disk) and the answer is set and sent
// through the returned DTLSDeferred, whose Done must be called exactly
// once. Meanwhile a retransmission of the request is not handled again:
// it is dropped, and after Done answered from the response cache. Call it
// at most once, from the handler, before it returns; the request message
// stays valid until Done.
func (w *DTLSResponseWriter) Defer() *DTLSDeferred {
	if w.deferred == nil {
		w.deferred = &DTLSDeferred{w: w}
		c := w.conn
		c.cacheMu.Lock()
		c.cache.markPending(uint16(w.req.MessageID()))
		c.cacheMu.Unlock()
	}
	return w.deferred
}

// DTLSDeferred is an answer a handler gives after it has returned
// (DTLSResponseWriter.Defer).
//
// Done may come before the handler has returned (the disk was quick, on
// another goroutine): the answer is then sent when the handler returns,
// never earlier, because until then the handler and the server still use
// the writer and the request, which completing releases.
type DTLSDeferred struct {
	w        *DTLSResponseWriter
	mu       sync.Mutex
	returned bool // the handler has returned
	done     bool // Done was called
}

// SetResponse is DTLSResponseWriter.SetResponse for the deferred answer.
func (d *DTLSDeferred) SetResponse(code codes.Code, cf message.MediaType, r io.ReadSeeker, opts ...message.Option) error {
	return d.w.SetResponse(code, cf, r, opts...)
}

// Done sends the answer set with SetResponse (4.04 if none was), keeps it
// for retransmissions and releases the request. Only the first call does
// anything.
func (d *DTLSDeferred) Done() {
	d.mu.Lock()
	if d.done {
		d.mu.Unlock()
		return
	}
	d.done = true
	ready := d.returned
	d.mu.Unlock()
	if ready {
		d.complete()
	}
}

// handlerReturned is the server's side of the hand-over: the handler that
// deferred has returned.
func (d *DTLSDeferred) handlerReturned() {
	d.mu.Lock()
	d.returned = true
	ready := d.done
	d.mu.Unlock()
	if ready {
		d.complete()
	}
}

func (d *DTLSDeferred) complete() {
	w := d.w
	c := w.conn
	c.finish(w.req, w, w.extra, time.Now())
	w.answered()
	// Sent and stored, or nothing to store (No-Response, an answer that
	// could not be encoded): no longer pending either way.
	c.cacheMu.Lock()
	c.cache.unmarkPending(uint16(w.req.MessageID()))
	c.cacheMu.Unlock()
	releaseMessage(w.req)
	releaseWriter(w)
}

// writers recycles response writers: a handler's w is valid until it
// returns, or with Defer until Done.
var writers = sync.Pool{New: func() any { return new(DTLSResponseWriter) }}

func releaseWriter(w *DTLSResponseWriter) {
	releaseMessage(w.msg)
	*w = DTLSResponseWriter{}
	writers.Put(w)
}

// Conn is nil (see DTLSResponseWriter).
func (w *DTLSResponseWriter) Conn() mux.Conn { return nil }

// Session is the DTLS session the request came on.
func (w *DTLSResponseWriter) Session() *DTLSConn { return w.conn }

// SetResponse sets the answer's code, options and body (nil: no payload,
// and no Content-Format).
func (w *DTLSResponseWriter) SetResponse(code codes.Code, cf message.MediaType, d io.ReadSeeker, opts ...message.Option) error {
	if w.noRe != nil {
		if err := noresponse.IsNoResponseCode(code, *w.noRe); err != nil {
			return err
		}
	}
	w.set = true
	w.msg.SetCode(code)
	w.msg.ResetOptionsTo(opts)
	if d != nil {
		w.msg.SetContentFormat(cf)
		w.msg.SetBody(d)
	}
	return nil
}

// Message is the answer being built (handlers may add options to it).
func (w *DTLSResponseWriter) Message() *pool.Message { return w.msg }

// SetMessage replaces the answer.
func (w *DTLSResponseWriter) SetMessage(m *pool.Message) { w.msg, w.set = m, true }

// msgs recycles request and answer messages. Not go-coap's pool.Pool: its
// count of pooled messages does not learn that a GC emptied the sync.Pool
// beneath it, so after a few GCs it stops taking messages back and every
// request allocates two new ones (seen in the firmware benchmark's profile).
var msgs = sync.Pool{New: func() any { return pool.NewMessage(context.Background()) }}

func acquireMessage(ctx context.Context) *pool.Message {
	m := msgs.Get().(*pool.Message)
	m.Reset()
	m.SetContext(ctx)
	return m
}

func releaseMessage(m *pool.Message) {
	m.SetContext(context.Background())
	m.Reset()
	msgs.Put(m)
}

// readHandlerConn is a DTLS connection that hands each decrypted record
// to a function on its own record reader (pion/dtls with the patch in
// third_party/: Conn.SetReadHandler).
type readHandlerConn interface {
	SetReadHandler(h func(p []byte, err error)) error
}

// inlineReadHandlerConn can also run the handler on the listener's read
// loop (DTLSServeConfig.Inline).
type inlineReadHandlerConn interface {
	SetInlineReadHandler(h func(p []byte, err error)) error
}

// serveConn runs the handshake, then hands the session to its record
// reader (onRecord) and returns: an established session has no goroutine
// of ours.
func (s *dtlsServer) serveConn(ctx context.Context, rw net.Conn) {
	cfg := s.cfg
	rh, ok := rw.(readHandlerConn)
	if !ok {
		cfg.Errors(fmt.Errorf("%v: %T cannot hand its records to a handler (is the pion/dtls copy in third_party/ in use?)", rw.RemoteAddr(), rw))
		_ = rw.Close()
		return
	}
	if hs, ok := rw.(interface{ HandshakeContext(context.Context) error }); ok {
		hctx, cancel := context.WithTimeout(ctx, cfg.HandshakeTimeout)
		err := hs.HandshakeContext(hctx)
		cancel()
		if err != nil {
			cfg.Errors(fmt.Errorf("%v: handshake failed: %w", rw.RemoteAddr(), err))
			_ = rw.Close()
			return
		}
	}
	cctx, cancel := context.WithCancel(ctx)
	c := &DTLSConn{nc: rw, ctx: cctx, cancel: cancel, srv: s, cache: NewResponseCache(cfg.ResponseCacheEntries)}
	c.msgID.Store(uint32(message.GetMID()))
	if !s.add(c) {
		cancel()
		_ = rw.Close()
		return
	}
	if cfg.OnNewConn != nil {
		cfg.OnNewConn(c)
	}
	c.lastRead.Store(time.Now().UnixNano())
	// Set before it can fire: checkIdle resets it.
	c.idle = time.AfterFunc(time.Duration(math.MaxInt64), c.checkIdle)
	c.idle.Reset(cfg.IdleTimeout)
	set := rh.SetReadHandler
	if ih, ok := rw.(inlineReadHandlerConn); ok && cfg.Inline != nil && cfg.Inline(c) {
		set = ih.SetInlineReadHandler
	}
	if err := set(c.onRecord); err != nil {
		cfg.Errors(fmt.Errorf("%v: %w", rw.RemoteAddr(), err))
		c.end()
	}
}

// onRecord takes one decrypted record, an error, or (io.EOF) the end of
// the session, on the session's record reader. p is pion's read buffer,
// valid only until onRecord returns: handleDatagram decodes it into a
// pooled message (a copy) and keeps no reference to it.
func (c *DTLSConn) onRecord(p []byte, err error) {
	cfg := c.srv.cfg
	if err != nil {
		if errors.Is(err, io.EOF) {
			c.end()
			return
		}
		var te *piondtls.TemporaryError
		if errors.As(err, &te) {
			// The record was consumed and the session is intact (a stray
			// record type).
			cfg.Errors(fmt.Errorf("%v: record dropped: %w", c.RemoteAddr(), err))
			return
		}
		if c.ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
			cfg.Errors(fmt.Errorf("%v: read: %w", c.RemoteAddr(), err))
		}
		_ = c.Close()
		return
	}
	now := time.Now()
	c.lastRead.Store(now.UnixNano())
	if len(p) > cfg.ReadBufferSize {
		cfg.Errors(fmt.Errorf("%v: record dropped: %d bytes, over the %d-byte limit (ReadBufferSize)", c.RemoteAddr(), len(p), cfg.ReadBufferSize))
		c.refuseDatagram(p, now)
		return
	}
	c.handleDatagram(p, now)
}

// refuseDatagram answers a confirmable request too large to be read
// (over ReadBufferSize) with 4.13: dropped silently, it left the device
// retransmitting it until it gave up, never told why. Its options are
// read where they lie in p (for the path, and so the limit), nothing is
// copied; a NON, or a message whose header or options do not decode, is
// only dropped.
func (c *DTLSConn) refuseDatagram(p []byte, now time.Time) {
	cfg := c.srv.cfg
	var opts [16]message.Option
	m := message.Message{Options: opts[:0]}
	if _, err := coder.DefaultCoder.Decode(p, &m); err != nil {
		if cfg.OnTooLarge != nil {
			cfg.OnTooLarge(c, "", uint64(len(p)), uint32(cfg.ReadBufferSize), false) //nolint:gosec // a buffer size
		}
		return
	}
	if m.Code == codes.Empty || m.Code >= codes.Created || (m.Type != message.Confirmable && m.Type != message.NonConfirmable) {
		return // not a request: dropped, as any (handleDatagram)
	}
	path, _ := m.Options.Path()
	limit := c.bodyLimit(path)
	if cfg.OnTooLarge != nil {
		cfg.OnTooLarge(c, path, uint64(len(p)), limit, m.Type == message.Confirmable)
	}
	if m.Type != message.Confirmable {
		return
	}
	var sz [4]byte
	out := message.Message{Token: m.Token, Code: codes.RequestEntityTooLarge, MessageID: m.MessageID, Type: message.Acknowledgement,
		Options: message.Options{{ID: message.ContentFormat}, {ID: message.Size1, Value: sz[:putUint(sz[:], limit)]}},
		Payload: fmt.Appendf(nil, "message of %d bytes, over the %d bytes one datagram may carry; body at most %d bytes, in Block1 blocks",
			len(p), c.srv.cfg.ReadBufferSize, limit)}
	c.send(uint16(m.MessageID), out, now)
}

// bodyLimit is BodyLimit's for path, within MaxMessageSize.
func (c *DTLSConn) bodyLimit(path string) uint32 {
	most := c.srv.cfg.MaxMessageSize
	if f := c.srv.cfg.BodyLimit; f != nil {
		if l := f(c, path); l > 0 && l < most {
			return l
		}
	}
	return most
}

// checkIdle runs when the idle timer fires: a session that has read
// nothing for IdleTimeout is closed, any other gets the timer again for
// the rest of its time. Reading moves only a timestamp, not the timer.
func (c *DTLSConn) checkIdle() {
	cfg := c.srv.cfg
	if rest := cfg.IdleTimeout - time.Since(time.Unix(0, c.lastRead.Load())); rest > 0 {
		c.idle.Reset(rest)
		return
	}
	if c.ctx.Err() != nil {
		return
	}
	if cfg.OnIdle != nil {
		cfg.OnIdle(c)
	}
	_ = c.Close()
}

// end runs once, when the session has ended: it runs the AddOnClose
// functions and lets ServeDTLS return.
func (c *DTLSConn) end() {
	c.endOnce.Do(func() {
		c.cancel()
		c.idle.Stop()
		_ = c.Close()
		c.srv.remove(c)
		c.mu.Lock()
		fs := c.onClose
		c.onClose = nil
		c.mu.Unlock()
		for _, f := range fs {
			f()
		}
		c.srv.sessions.Done()
	})
}

// handleDatagram answers one decrypted CoAP message, read at now.
func (c *DTLSConn) handleDatagram(data []byte, now time.Time) {
	cfg := c.srv.cfg
	req := acquireMessage(c.ctx)
	deferred := false
	defer func() {
		if !deferred { // else DTLSDeferred.Done releases it
			releaseMessage(req)
		}
	}()
	if _, err := req.UnmarshalWithDecoder(coder.DefaultCoder, data); err != nil {
		// RFC 7252 §4.2: a malformed CON whose header we can read is
		// rejected with RST; anything else is silently ignored.
		answer := "none"
		if len(data) >= 4 && data[0]>>6 == 1 && (data[0]>>4)&3 == byte(message.Confirmable) {
			c.writeRST(binary.BigEndian.Uint16(data[2:4]))
			answer = "RST"
		}
		if cfg.OnBadRequest != nil {
			cfg.OnBadRequest(c, "", answer, "malformed CoAP message: "+err.Error())
		}
		cfg.Errors(fmt.Errorf("%v: malformed coap message: %w", c.RemoteAddr(), err))
		return
	}
	typ, code := req.Type(), req.Code()
	if code == codes.Empty {
		if typ == message.Confirmable { // ping
			c.writeRST(uint16(req.MessageID()))
		}
		return
	}
	if code >= codes.Created || (typ != message.Confirmable && typ != message.NonConfirmable) {
		// Responses, ACKs and RSTs: this server sends no requests and
		// only NON notifications, so there is nothing to match them to.
		return
	}
	mid := uint16(req.MessageID())
	c.cacheMu.Lock()
	if s, ok := c.cache.load(mid); ok {
		wp := wireBufs.Get().(*[]byte)
		raw, err := s.answer((*wp)[:0])
		if err == nil {
			_, err = c.nc.Write(raw)
			*wp = raw[:0]
			wireBufs.Put(wp)
			c.cacheMu.Unlock()
			if err != nil {
				cfg.Errors(fmt.Errorf("%v: write cached answer: %w", c.RemoteAddr(), err))
			}
			return
		}
		wireBufs.Put(wp)
		// The answer's body can no longer be read (its image was dropped):
		// the request is answered afresh.
		s.drop()
	}
	pending := c.cache.isPending(mid)
	c.cacheMu.Unlock()
	if pending {
		// A retransmission of a request whose answer was deferred: the
		// answer goes out when it is ready, and a later retransmission
		// gets it from the cache.
		return
	}
	var badBuf [4]message.OptionID
	if bad := unrecognisedCritical(req.Options(), cfg.CriticalOptions, badBuf[:0]); len(bad) > 0 {
		c.refuseOptions(req, bad, now)
		return
	}
	w := writers.Get().(*DTLSResponseWriter)
	*w = DTLSResponseWriter{conn: c, msg: acquireMessage(c.ctx), req: req}
	defer func() {
		if !deferred {
			releaseWriter(w)
		}
	}()
	if v, err := req.GetOptionUint32(message.NoResponse); err == nil {
		w.noRe = &v
	}
	var block1 []message.Option
	if v, err := req.GetOptionUint32(message.Block1); err == nil {
		var done bool
		block1, done = c.block1(w, req, v)
		if done {
			c.finish(req, w, nil, now)
			return
		}
	}
	w.msg.SetCode(codes.NotFound)
	w.extra = block1
	cfg.Handler(w, req)
	// w is still ours here even if the handler deferred and the answer is
	// already Done: completing waits for handlerReturned.
	if d := w.deferred; d != nil {
		deferred = true
		d.handlerReturned()
		return
	}
	c.finish(req, w, block1, now)
	w.answered()
}

// unrecognisedCritical appends to bad, once each in option order, the
// critical options of opts that neither ServeDTLS nor the handler
// (handled) processes, and those it processes whose length is outside the
// option's range (RFC 7252 §5.4.3 counts them as unrecognised).
func unrecognisedCritical(opts message.Options, handled []message.OptionID, bad []message.OptionID) []message.OptionID {
	for _, o := range opts {
		if o.ID%2 == 0 {
			continue
		}
		ok := false
		switch o.ID {
		case message.URIHost, message.URIPort, message.URIPath, message.Block1, message.Block2:
			ok = true
		default:
			ok = slices.Contains(handled, o.ID)
		}
		if ok {
			if _, known := message.CoapOptionDefs[o.ID]; known && !message.VerifyOptLen(o.ID, len(o.Value)) {
				ok = false
			}
		}
		if !ok && !slices.Contains(bad, o.ID) {
			bad = append(bad, o.ID)
		}
	}
	return bad
}

// refuseOptions answers a request carrying critical options nobody here
// processes (unrecognisedCritical): 4.02 naming them for a CON, kept for
// its retransmissions; nothing for a NON (RFC 7252 §4.3: rejecting a NON
// may send RST, and must otherwise ignore it; go-coap's server, which
// ServeDTLS replaced, ignores it too).
func (c *DTLSConn) refuseOptions(req *pool.Message, bad []message.OptionID, now time.Time) {
	cfg := c.srv.cfg
	con := req.Type() == message.Confirmable
	if cfg.OnBadOption != nil {
		cfg.OnBadOption(c, con, bad)
	}
	if !con {
		return
	}
	diag := make([]byte, 0, 48)
	diag = append(diag, "unrecognised critical option"...)
	for i, id := range bad {
		if i == 0 {
			diag = append(diag, ' ')
		} else {
			diag = append(diag, ',')
		}
		diag = strconv.AppendUint(diag, uint64(id), 10)
	}
	out := message.Message{Token: req.Token(), Code: codes.BadOption, MessageID: req.MessageID(), Type: message.Acknowledgement,
		Options: message.Options{{ID: message.ContentFormat}}, Payload: diag}
	c.send(uint16(req.MessageID()), out, now)
}

// block1 takes one Block1 block: it answers 2.31, 4.08 or 4.13 itself
// (done) or, on the last block, puts the reassembled body into req and
// returns the Block1 option the final answer carries.
func (c *DTLSConn) block1(w *DTLSResponseWriter, req *pool.Message, v uint32) ([]message.Option, bool) {
	// The blocks of one body share the path and Request-Tag (RFC 9175);
	// clients change the token from block to block (libcoap does).
	path, _ := req.Path()
	refuse := func(code codes.Code, why string) ([]message.Option, bool) {
		_ = w.SetResponse(code, message.TextPlain, strings.NewReader(why))
		if f := c.srv.cfg.OnBadRequest; f != nil {
			f(c, path, fmt.Sprintf("%d.%02d", code>>5, code&0x1f), why)
		}
		return nil, true
	}
	szx, num, more, err := blockwise.DecodeBlockOption(v)
	if err != nil {
		return refuse(codes.BadOption, "bad Block1 option")
	}
	tag, _ := req.GetOptionBytes(message.RequestTag)
	key := path + "\x00" + string(tag)
	if num == 0 {
		c.b1Key, c.b1Next, c.b1Body = key, 0, c.b1Body[:0]
	}
	if key != c.b1Key || num != c.b1Next {
		c.b1Key, c.b1Body = "", nil
		return refuse(codes.RequestEntityIncomplete, "Block1 block out of order; start again at block 0")
	}
	var part []byte
	if b := req.Body(); b != nil {
		part, _ = io.ReadAll(b)
	}
	if more && int64(len(part)) != szx.Size() {
		c.b1Key, c.b1Body = "", nil
		return refuse(codes.BadRequest, "Block1 block shorter than its size")
	}
	size := uint64(len(c.b1Body)) + uint64(len(part))
	if num == 0 {
		// RFC 7959 §4: Size1 in a request announces the body's size.
		if announced, err := req.GetOptionUint32(message.Size1); err == nil {
			size = max(size, uint64(announced))
		}
	}
	if limit := c.bodyLimit(path); size > uint64(limit) {
		c.b1Key, c.b1Body = "", nil
		if c.srv.cfg.OnTooLarge != nil {
			c.srv.cfg.OnTooLarge(c, path, size, limit, true)
		}
		var sz [4]byte
		n := putUint(sz[:], limit)
		_ = w.SetResponse(codes.RequestEntityTooLarge, message.TextPlain,
			strings.NewReader(fmt.Sprintf("request body over %d bytes", limit)),
			message.Option{ID: message.Size1, Value: sz[:n]})
		return nil, true
	}
	c.b1Body = append(c.b1Body, part...)
	c.b1Next = num + 1
	opt, _ := blockwise.EncodeBlockOption(szx, num, more)
	var ob [4]byte
	optVal := ob[:putUint(ob[:], opt)]
	if more {
		_ = w.SetResponse(codes.Continue, message.TextPlain, nil, message.Option{ID: message.Block1, Value: optVal})
		return nil, true
	}
	body := c.b1Body
	c.b1Key, c.b1Body = "", nil
	req.SetBody(bytes.NewReader(body))
	req.Remove(message.Block1)
	return []message.Option{{ID: message.Block1, Value: append([]byte(nil), optVal...)}}, false
}

// putUint is message.EncodeUint32 without its allocation for 3-byte
// values, which every Block2 option past block 4095 of an image needs.
func putUint(b []byte, v uint32) int {
	switch {
	case v == 0:
		return 0
	case v < 1<<8:
		b[0] = byte(v)
		return 1
	case v < 1<<16:
		binary.BigEndian.PutUint16(b, uint16(v))
		return 2
	case v < 1<<24:
		b[0], b[1], b[2] = byte(v>>16), byte(v>>8), byte(v)
		return 3
	}
	binary.BigEndian.PutUint32(b, v)
	return 4
}

func (c *DTLSConn) writeRST(mid uint16) {
	rst := []byte{0x70, 0, 0, 0}
	binary.BigEndian.PutUint16(rst[2:], mid)
	_, _ = c.nc.Write(rst)
}

// finish encodes the answer (cutting a Block2 block out of its body),
// sends it and keeps it for retransmissions. now is when the request was
// read.
func (c *DTLSConn) finish(req *pool.Message, w *DTLSResponseWriter, extra []message.Option, now time.Time) {
	cfg := c.srv.cfg
	mid := uint16(req.MessageID())
	if !w.set && w.noRe != nil {
		// No-Response suppressed the handler's answer: a NON gets nothing,
		// a CON still needs its (empty) ACK.
		if req.Type() == message.Confirmable {
			c.send(mid, message.Message{MessageID: int32(mid), Type: message.Acknowledgement}, now)
		}
		return
	}
	resp := w.msg
	out := message.Message{
		Token:     req.Token(),
		Code:      resp.Code(),
		Options:   resp.Options(),
		MessageID: int32(mid),
		Type:      message.Acknowledgement,
	}
	if req.Type() != message.Confirmable {
		out.Type = message.NonConfirmable
		out.MessageID = int32(c.NextMessageID())
	}
	for _, o := range extra {
		out.Options = out.Options.Set(o)
	}
	body := resp.Body()
	if body == nil {
		c.send(mid, out, now)
		return
	}
	size, err := bodySize(body)
	if err != nil {
		c.answerError(req, codes.InternalServerError, "response body unreadable", now)
		return
	}
	szx := cfg.BlockwiseSZX
	reqBlock, hasBlock := uint32(0), false
	if v, err := req.GetOptionUint32(message.Block2); err == nil {
		reqBlock, hasBlock = v, true
		if rs, _, _, err := blockwise.DecodeBlockOption(v); err == nil && rs < szx {
			szx = rs
		}
	}
	bs := int64(szx.Size())
	off, n := int64(0), size
	if hasBlock || size > bs {
		_, num, _, err := blockwise.DecodeBlockOption(reqBlock)
		off = num * bs
		if err != nil || (off >= size && !(off == 0 && size == 0)) {
			c.answerError(req, codes.BadOption, "Block2 beyond the end of the resource", now)
			return
		}
		n = min(bs, size-off)
		opt, _ := blockwise.EncodeBlockOption(szx, num, off+n < size)
		var ob, sb [4]byte
		out.Options = out.Options.Set(message.Option{ID: message.Block2, Value: ob[:putUint(ob[:], opt)]})
		if !out.Options.HasOption(message.Size2) && size <= 1<<32-1 {
			out.Options = out.Options.Set(message.Option{ID: message.Size2, Value: sb[:putUint(sb[:], uint32(size))]})
		}
	}
	if err := c.sendBody(mid, out, body, off, int(n), now); err != nil {
		c.answerError(req, codes.InternalServerError, "response body unreadable", now)
	}
}

// bodySize is the length of a response body: Size if it has one (an
// io.SectionReader, what Cache.ServeCoAP answers with), else its end.
func bodySize(body io.ReadSeeker) (int64, error) {
	if s, ok := body.(interface{ Size() int64 }); ok {
		return s.Size(), nil
	}
	return body.Seek(0, io.SeekEnd)
}

// readBody reads body's n bytes at off into p: with ReadAt if it has it
// (no shared offset to move), else Seek and read.
func readBody(body io.ReadSeeker, p []byte, off int64) error {
	if ra, ok := body.(io.ReaderAt); ok {
		n, err := ra.ReadAt(p, off)
		if n == len(p) {
			return nil
		}
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		return err
	}
	if _, err := body.Seek(off, io.SeekStart); err != nil {
		return err
	}
	_, err := io.ReadFull(body, p)
	return err
}

func (c *DTLSConn) answerError(req *pool.Message, code codes.Code, diag string, now time.Time) {
	out := message.Message{Token: req.Token(), Code: code, MessageID: req.MessageID(), Type: message.Acknowledgement, Payload: []byte(diag)}
	if req.Type() != message.Confirmable {
		out.Type, out.MessageID = message.NonConfirmable, int32(c.NextMessageID())
	}
	out.Options = message.Options{{ID: message.ContentFormat}}
	c.send(uint16(req.MessageID()), out, now)
	c.srv.cfg.Errors(fmt.Errorf("%v: %s", c.RemoteAddr(), diag))
}

// send encodes and writes out (its Payload included), keeping it for a
// retransmission of the request with message ID reqMID.
func (c *DTLSConn) send(reqMID uint16, out message.Message, now time.Time) {
	p := out.Payload
	out.Payload = nil
	_ = c.sendBody(reqMID, out, bytes.NewReader(p), 0, len(p), now)
}

// errAnswer: an answer with a message ID, type or token RFC 7252 cannot
// carry (go-coap's encoder refuses the same).
var errAnswer = errors.New("answer not encodable: bad message ID, type or token")

// wireBufs hold one encoded answer while it is written.
var wireBufs = sync.Pool{New: func() any { b := make([]byte, 0, 1472); return &b }}

// sendBody encodes out with n bytes of body at off as its payload
// (out.Payload is not used), writes it and keeps it for a retransmission
// of the request with message ID reqMID, sent at now: a copy of it, or,
// for a StableBody, a copy of the bytes before the payload and where the
// payload is. The payload is read straight from the body into the
// datagram's buffer. An error reading the body is returned (nothing was
// sent); others are reported to Errors.
func (c *DTLSConn) sendBody(reqMID uint16, out message.Message, body io.ReadSeeker, off int64, n int, now time.Time) error {
	wp := wireBufs.Get().(*[]byte)
	defer wireBufs.Put(wp)
	raw, err := encodeAnswer((*wp)[:0], out, body, off, n)
	if err != nil {
		if errors.Is(err, errBody) {
			return err
		}
		c.srv.cfg.Errors(fmt.Errorf("%v: encode answer: %w", c.RemoteAddr(), err))
		return nil
	}
	*wp = raw[:0] // keep a grown buffer
	// Kept before it is written: a deferred answer's request stays marked
	// pending until this returns, and a retransmission that found it
	// pending and not yet kept would be dropped, though the device, having
	// lost the answer, would not be answered again until it retransmits
	// once more (or never, if that was its last try).
	c.cacheMu.Lock()
	if sb, ok := body.(StableBody); ok && n > 0 {
		c.cache.storeRef(reqMID, raw[:len(raw)-n], sb, off, n, now)
	} else {
		c.cache.store(reqMID, raw, now)
	}
	c.cacheMu.Unlock()
	_, werr := c.nc.Write(raw)
	if werr != nil {
		c.srv.cfg.Errors(fmt.Errorf("%v: write answer: %w", c.RemoteAddr(), werr))
	}
	return nil
}

// errBody wraps an error reading a response body.
var errBody = errors.New("read response body")

// encodeAnswer encodes out into buf's storage (a larger buffer if it is
// too small) as RFC 7252 §3 lays a message out (what go-coap's udp coder writes: header, token, options, then 0xFF
// and the payload if there is one), with n bytes of body at off as the
// payload. The options are marshalled once (go-coap's Encode marshals
// them twice, its Size once more).
func encodeAnswer(buf []byte, out message.Message, body io.ReadSeeker, off int64, n int) ([]byte, error) {
	if !message.ValidateMID(out.MessageID) || !message.ValidateType(out.Type) || len(out.Token) > message.MaxTokenSize {
		return nil, errAnswer
	}
	hdr := 4 + len(out.Token)
	buf = buf[:cap(buf)]
	if len(buf) < hdr {
		buf = make([]byte, 1472)
	}
	optLen, err := out.Options.Marshal(buf[hdr:])
	if errors.Is(err, message.ErrTooSmall) {
		buf = make([]byte, hdr+optLen+1+n)
		optLen, err = out.Options.Marshal(buf[hdr:])
	}
	if err != nil {
		return nil, err
	}
	size := hdr + optLen
	if n > 0 {
		size += 1 + n
	}
	if len(buf) < size {
		nb := make([]byte, size)
		copy(nb[hdr:], buf[hdr:hdr+optLen])
		buf = nb
	}
	buf = buf[:size]
	buf[0] = 1<<6 | byte(out.Type)<<4 | byte(len(out.Token))
	buf[1] = byte(out.Code)
	binary.BigEndian.PutUint16(buf[2:4], uint16(out.MessageID))
	copy(buf[4:], out.Token)
	if n > 0 {
		buf[hdr+optLen] = 0xff
		if err := readBody(body, buf[hdr+optLen+1:], off); err != nil {
			return nil, fmt.Errorf("%w: %w", errBody, err)
		}
	}
	return buf, nil
}
