package gateway

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/firewall"
	"github.com/bastion-iot/bastion/gateway/store"
	"github.com/bastion-iot/bastion/internal/connlimit"
	"github.com/bastion-iot/bastion/pki"
	"github.com/bastion-iot/bastion/pki/est"
)

// EST over HTTPS (RFC 7030) for MQTT-only devices on pairing.est_listen.
// The listener exists only while a pairing window is open (and only then
// is its port in the firewall policy). IDevID devices: GET
// /.well-known/est/cacerts and POST /.well-known/est/simpleenroll, the TLS
// client certificate chaining to a configured vendor root. Setup-code
// devices present no client certificate and run SPAKE2+ in the requests
// themselves (pairing_pake_https.go).

const (
	estCACertsPath = "/.well-known/est/cacerts"
	estEnrollPath  = "/.well-known/est/simpleenroll"
	maxESTBody     = 8 << 10
)

// estKick tells runEST that the window may have opened or closed.
func (p *pairingSvc) estKick() {
	select {
	case p.estChange <- struct{}{}:
	default:
	}
}

// runEST opens and closes the HTTPS listener with the window, until ctx
// ends.
func (p *pairingSvc) runEST(ctx context.Context) error {
	var srv *http.Server
	var done chan struct{}
	stop := func() {
		if srv == nil {
			return
		}
		// Shutdown closes the listener at once and lets the request that
		// closed the window deliver its certificate.
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if srv.Shutdown(sctx) != nil {
			srv.Close()
		}
		cancel()
		<-done
		srv, done = nil, nil
		// The address first: a reload from here on builds its policy
		// without the port. Cleared after, a reload in between would put
		// the port back in after estFirewall took it out, and leave it
		// open until the next reload.
		p.estAddr.Store("")
		p.estFirewall(false)
		p.g.log.Info("pairing: EST over HTTPS closed with the window")
	}
	defer stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-p.estChange:
		}
		open := p.win.IsOpen()
		switch {
		case open && srv == nil:
			ln, err := p.listenEST()
			if err != nil {
				p.g.log.Error("pairing: EST over HTTPS not opened; IDevID devices can still enroll over CoAPS", "err", err)
				p.event("system", "pairing.est_failed", "", err.Error())
				continue
			}
			// The address first: a reload from here on keeps the port in
			// its policy.
			p.estAddr.Store(ln.Addr().String())
			p.estFirewall(true)
			srv = &http.Server{Handler: p.estHandler(), ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
				// An enrollment is a few requests in a row: a device
				// has no use for a connection idle this long.
				IdleTimeout: 30 * time.Second,
				// A handshake verify let through with a certificate is
				// an IDevID's (verify in listenEST): its connection is
				// claimed at its first request.
				ConnState: func(c net.Conn, st http.ConnState) {
					if tc, ok := c.(*tls.Conn); ok && st == http.StateActive && len(tc.ConnectionState().PeerCertificates) > 0 {
						connlimit.Claim(c)
					}
				},
				ErrorLog:    p.estRefusals.errorLog(),
				BaseContext: func(net.Listener) context.Context { return ctx }}
			done = make(chan struct{})
			go func(s *http.Server, done chan struct{}) {
				defer close(done)
				s.Serve(ln)
			}(srv, done)
			p.g.log.Info("pairing: EST over HTTPS open while the window is", "addr", ln.Addr())
		case !open && srv != nil:
			stop()
		}
	}
}

// listenEST listens on pairing.est_listen as the gateway started with it
// (a reload keeps the running value: it takes effect at the next restart).
func (p *pairingSvc) listenEST() (net.Listener, error) {
	cfg := p.g.cfg.Load()
	listen := cfg.Pairing.ESTListen
	if listen == "" {
		// tls.Listen would take "" for every address and a random port,
		// which estFirewall would then open on the lan.
		return nil, errors.New("pairing.est_listen is empty: EST over HTTPS is off")
	}
	if p.estCert == nil {
		sans, err := p.g.serverSANs(*cfg, listen)
		if err != nil {
			p.g.log.Warn("server certificate names without the lan's addresses; the next window checks them again", "listener", "est", "err", err)
		}
		sc, err := p.g.ca.ServerCert("est", sans, cfg.PKI.ServerCertValidity.D(), cfg.PKI.RenewBefore.D())
		if err != nil {
			return nil, err
		}
		p.estCert = sc
	} else if err := p.g.refreshServerCert(*cfg, "est", listen, p.estCert); err != nil {
		// Due, or the lan's addresses changed since the last window.
		return nil, err
	}
	if p.estRefusals == nil {
		p.estRefusals = p.g.newHTTPSRefusals("est", "pairing: EST over HTTPS", p.g.log, slog.LevelWarn)
	}
	// Anyone on the LAN can open connections that fail the handshake while
	// the window is open: each is counted, the lines are spaced and the
	// claimed id and error cut.
	caErr := errors.New("not a manufacturer certificate of a configured vendor")
	verify := func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 {
			// A setup-code device: it proves itself with the PAKE, and
			// simpleenroll refuses a request without a certificate.
			return nil
		}
		dev, err := p.verifyIDevID(raw, caErr)
		var reason string
		switch {
		case err == nil && dev != "":
			return nil
		case err == nil:
			err, reason = errors.New("no device identity"), hub.ReasonBadCert
		case errors.Is(err, caErr):
			reason = hub.ReasonWrongCA
		default:
			reason = hub.CertRefusal(err)
		}
		return p.estRefusals.cert(reason, hub.ClaimedDevice(raw), err)
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, fmt.Errorf("pairing.est_listen %s: %w", listen, err)
	}
	return tls.NewListener(p.limitEST(ln), pki.TLSServer(p.estCert, tls.RequestClientCert, verify)), nil
}

// The EST listener's bounds (a connlimit.Listener). The handshake takes a
// connection without a client certificate (a setup-code device), so while
// a window is open any LAN host can open connections and keep them alive:
// each holds a goroutine, TLS state and an fd. Enrollment is one device at
// a time (setup code) or a few (IDevID), so the bounds are small. A
// connection whose handshake verified an IDevID is claimed (runEST's
// ConnState). A setup-code device's is not: it proves nothing before its
// PAKE's second request, and its exchange takes milliseconds, so only a
// flood within those pushes it out.
const (
	estMaxConns              = 16
	estMaxClaimedPerAddr     = 4
	estMaxUnclaimedPerAddr   = 4
	estMaxUnclaimedPerPrefix = 8
	estMaxUnclaimed          = 8
)

// limitEST bounds ln's connections as the constants above say, counting
// and logging each it closes as the firmware listener's.
func (p *pairingSvc) limitEST(ln net.Listener) net.Listener {
	unauth := bridges.NewSourceLimit[net.Conn](estMaxUnclaimedPerAddr, estMaxUnclaimedPerPrefix, estMaxUnclaimed)
	return connlimit.New(ln, estMaxConns, estMaxClaimedPerAddr, unauth, p.estRefusals.connEvents(unauth, estMaxUnclaimedPerAddr, estMaxUnclaimedPerPrefix, estMaxUnclaimed, estMaxConns))
}

// estFirewall applies the policy with the EST port in it while the
// listener is up (ESTAddr set: firewallExtra), and without it after (open
// says which, for the log): the configuration's policy, as Reload builds
// it. Under reloadMu, as Reload: the configuration it reads stays the one
// in force until its policy is applied. Without it a reload could apply
// the new file's policy between the read and the apply, and this apply,
// built from the old file, would replace it: the kernel would enforce the
// old file while the gateway holds the new one, until the next reload.
func (p *pairingSvc) estFirewall(open bool) {
	if p.g.fw == nil {
		return
	}
	p.g.reloadMu.Lock()
	defer p.g.reloadMu.Unlock()
	cfg := p.g.cfg.Load()
	pol, err := cfg.FirewallPolicy(p.firewallExtra()...)
	if err == nil {
		apply := p.applyPolicy
		if apply == nil {
			apply = p.g.fw.Apply
		}
		// Bounded, as Reload's: reloadMu is held until it returns.
		ctx, cancel := context.WithTimeout(context.Background(), firewall.ApplyTimeout)
		err = apply(ctx, pol)
		cancel()
	}
	if err != nil {
		p.g.log.Error("pairing: firewall policy for EST over HTTPS not applied", "open", open, "err", err)
	}
}

// firewallExtra is the service the policy needs beyond the configuration
// now: the EST port while it listens.
func (p *pairingSvc) firewallExtra() []firewall.Service {
	_, port, err := net.SplitHostPort(p.ESTAddr())
	if err != nil {
		return nil
	}
	var n uint16
	if _, err := fmt.Sscan(port, &n); err != nil || n == 0 {
		return nil
	}
	return []firewall.Service{{Name: "est-https", Proto: firewall.TCP, Port: n, Zones: []string{firewall.ZoneLAN}, Handshake: true}}
}

// pairingFirewallExtra is firewallExtra for Reload (nil without pairing).
func (g *Gateway) pairingFirewallExtra() []firewall.Service {
	if g.pairing == nil {
		return nil
	}
	return g.pairing.firewallExtra()
}

// ESTAddr is the HTTPS EST address while a window is open, else "".
func (p *pairingSvc) ESTAddr() string {
	a, _ := p.estAddr.Load().(string)
	return a
}

func (p *pairingSvc) estHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+estCACertsPath, func(w http.ResponseWriter, r *http.Request) {
		der, err := est.EncodeCertsOnly(p.g.ca.Chain())
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		writeBase64(w, "application/pkcs7-mime", der)
	})
	mux.HandleFunc("POST "+estEnrollPath, p.estSimpleEnroll)
	mux.HandleFunc("POST "+est.PathPAKE, p.estPAKE)
	mux.HandleFunc("POST "+est.PathPAKEEnroll, p.estPAKEEnroll)
	return mux
}

func writeBase64(w http.ResponseWriter, ctype string, der []byte) {
	w.Header().Set("Content-Type", ctype)
	w.Header().Set("Content-Transfer-Encoding", "base64")
	io.WriteString(w, base64.StdEncoding.EncodeToString(der))
}

// decodeESTBody reads an RFC 7030 base64 body (line breaks allowed).
func decodeESTBody(r io.Reader) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, maxESTBody+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxESTBody {
		return nil, fmt.Errorf("body over %d bytes", maxESTBody)
	}
	clean := strings.Map(func(c rune) rune {
		if c == '\r' || c == '\n' || c == ' ' || c == '\t' {
			return -1
		}
		return c
	}, string(b))
	der, err := base64.StdEncoding.DecodeString(clean)
	if err != nil {
		return nil, fmt.Errorf("body is not base64 (RFC 7030 4.2.1): %w", err)
	}
	return der, nil
}

func (p *pairingSvc) estSimpleEnroll(w http.ResponseWriter, r *http.Request) {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		http.Error(w, "a manufacturer client certificate is required", http.StatusUnauthorized)
		return
	}
	if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/pkcs10") {
		http.Error(w, "Content-Type "+ct+": want application/pkcs10 (base64 DER)", http.StatusUnsupportedMediaType)
		return
	}
	peer := r.TLS.PeerCertificates
	raw := make([][]byte, len(peer))
	for i, c := range peer {
		raw[i] = c.Raw
	}
	device, err := p.verifyIDevID(raw, errors.New("not a manufacturer certificate of a configured vendor"))
	if err != nil {
		http.Error(w, err.Error(), http.StatusForbidden)
		return
	}
	csr, err := decodeESTBody(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	en, err := p.beginEnrol(device, peer)
	if err != nil {
		http.Error(w, err.Error(), http.StatusForbidden)
		return
	}
	en.method = "idevid-https"
	resp := est.Handler{Issuer: caIssuer{p.g}}.Handle(r.Context(), est.Request{Method: "POST", Path: est.PathSen,
		ContentFormat: est.FormatPKCS10, Accept: est.FormatCertsOnly, Payload: csr, DeviceID: en.opID})
	if resp.Issued == nil {
		en.fail("EST over HTTPS refused: " + errString(resp.Err))
		http.Error(w, string(resp.Payload), http.StatusBadRequest)
		return
	}
	if err := p.finishEnrol(en, store.Device{Auth: "cert"}, resp.Issued); err != nil {
		http.Error(w, err.Error(), http.StatusForbidden)
		return
	}
	writeBase64(w, "application/pkcs7-mime; smime-type=certs-only", resp.Payload)
}
