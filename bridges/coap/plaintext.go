package coap

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/ratelog"
)

// plaintextGuard makes a datagram that is not DTLS visible instead of lost.
// pion's listener drops any first datagram that is not a DTLS handshake
// without a trace, so a device speaking plain coap:// to a coaps port would
// just time out and nobody would know why. The guard puts pion's socket and
// a second socket of its own in one SO_REUSEPORT group with a classic BPF
// program that picks the socket in the kernel by the datagram's first byte:
// DTLS record types (20–25) go to pion, everything else to the guard, which
// logs (rate limited) and counts it and answers nothing (no reflection off
// spoofed sources). Nothing of pion's path changes; when the kernel refuses
// the program the guard is off and the ports behave as before.
type plaintextGuard struct {
	log *slog.Logger
	m   *hub.Metrics

	mu     sync.Mutex
	on     bool  // the program is attached to the listener's socket
	attach error // why it is not
	conn   *net.UDPConn
	done   chan struct{}
	lines  *ratelog.Every // by what the datagram looked like
}

// plaintextLogEvery spaces the guard's log lines: a device retransmitting
// plain CoAP, or a flood, is one line per interval plus the metric.
const plaintextLogEvery = 10 * time.Second

func newPlaintextGuard(log *slog.Logger, m *hub.Metrics) *plaintextGuard {
	return &plaintextGuard{log: log, m: m, lines: ratelog.New(plaintextLogEvery)}
}

// dtlsSteering returns index 0 (the first socket bound: pion's) for a
// datagram whose first byte is a DTLS content type and 1 (the guard) for
// anything else. An empty datagram aborts the program, which selects 0.
func dtlsSteering() []bpf.Instruction {
	return []bpf.Instruction{
		bpf.LoadAbsolute{Off: 0, Size: 1},
		bpf.JumpIf{Cond: bpf.JumpLessThan, Val: 20, SkipTrue: 2},
		bpf.JumpIf{Cond: bpf.JumpGreaterThan, Val: 25, SkipTrue: 1},
		bpf.RetConstant{Val: 0},
		bpf.RetConstant{Val: 1},
	}
}

// listenConfig is the socket set-up for pion's listener: SO_REUSEPORT and
// the steering program, attached before bind so pion's socket is index 0.
// A failure turns the guard off and leaves a plain socket (reuseport
// without the program would hash DTLS datagrams onto the guard).
func (g *plaintextGuard) listenConfig() net.ListenConfig {
	return net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var err error
		cerr := rc.Control(func(fd uintptr) { err = attachSteering(int(fd)) })
		g.mu.Lock()
		defer g.mu.Unlock()
		g.on, g.attach = cerr == nil && err == nil, errors.Join(cerr, err)
		if !g.on {
			_ = rc.Control(func(fd uintptr) { _ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 0) })
		}
		return nil
	}}
}

func attachSteering(fd int) error {
	raw, err := bpf.Assemble(dtlsSteering())
	if err != nil {
		return err
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
		return fmt.Errorf("SO_REUSEPORT: %w", err)
	}
	filter := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		filter[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_CBPF, &prog); err != nil {
		return fmt.Errorf("SO_ATTACH_REUSEPORT_CBPF: %w", err)
	}
	return nil
}

// open binds the guard's socket next to the listener bound at addr.
// With the guard off it logs once why and does nothing.
func (g *plaintextGuard) open(addr net.Addr) error {
	g.mu.Lock()
	on, why := g.on, g.attach
	g.mu.Unlock()
	if !on {
		g.log.Warn("coap: kernel refused the datagram steering program; plaintext datagrams on this DTLS port are dropped without a log line or metric", "listen", addr.String(), "err", why)
		return nil
	}
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var err error
		if cerr := rc.Control(func(fd uintptr) {
			err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); cerr != nil {
			return cerr
		}
		return err
	}}
	pc, err := lc.ListenPacket(context.Background(), "udp", addr.String())
	if err != nil {
		return fmt.Errorf("coap: bind the plaintext guard next to %s: %w", addr, err)
	}
	g.conn = pc.(*net.UDPConn)
	return nil
}

// start reads the guard's socket until close.
func (g *plaintextGuard) start() {
	if g.conn == nil {
		return
	}
	g.done = make(chan struct{})
	go g.serve()
}

func (g *plaintextGuard) serve() {
	defer close(g.done)
	buf := make([]byte, 64) // enough to tell what it is; the rest is truncated
	for {
		n, from, err := g.conn.ReadFromUDP(buf)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil || from == nil {
			continue
		}
		g.refuse(from, buf[:n])
	}
}

// refuse counts one datagram and logs it unless a line about the same kind
// of datagram went out less than plaintextLogEvery ago.
func (g *plaintextGuard) refuse(from *net.UDPAddr, pkt []byte) {
	g.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonPlaintext).Inc()
	saw := sniff(pkt)
	quiet, ok := g.lines.Allow(saw, time.Now())
	if !ok {
		return
	}
	g.log.Warn("coap: datagram refused: plaintext on a DTLS port; this port only accepts CoAP over DTLS (coaps://) with a device certificate or PSK",
		"device", "", "remote", from.String(), "listen", g.conn.LocalAddr().String(), "saw", saw, "not_logged_since_last_line", quiet)
}

// sniff names what a refused datagram looks like, for the log line.
func sniff(pkt []byte) string {
	if len(pkt) >= 4 && pkt[0]>>6 == 1 && pkt[0]&0x0f <= 8 {
		return "plaintext CoAP"
	}
	return "not DTLS"
}

// close stops the guard and waits for its reader if it was started.
func (g *plaintextGuard) close() {
	if g.conn == nil {
		return
	}
	g.conn.Close()
	if g.done != nil {
		<-g.done
	}
}
