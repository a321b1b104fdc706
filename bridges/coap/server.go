// Package coap terminates CoAP over DTLS 1.2 from devices: one listener for
// certificate devices and one for PSK devices (pion/dtls offers only PSK
// suites once a PSK callback is set). Every request is tied to the device
// identity the handshake proved. It never listens in cleartext.
package coap

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/plgd-dev/go-coap/v3/dtls"
	"github.com/plgd-dev/go-coap/v3/dtls/server"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/mux"
	coapnet "github.com/plgd-dev/go-coap/v3/net"
	"github.com/plgd-dev/go-coap/v3/options"
	"github.com/plgd-dev/go-coap/v3/pkg/runner/periodic"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/pki"
)

// Config is what the server needs from the gateway configuration.
type Config struct {
	Listen     string // certificate devices
	PSKListen  string // PSK devices; "" disables
	MaxPayload int
}

// Server is the CoAP-over-DTLS front end.
type Server struct {
	cfg  Config
	cert *pki.ServerCert
	id   bridges.Identity
	sink bridges.Sink
	log  *slog.Logger
	lnC  *coapnet.DTLSListener
	lnP  *coapnet.DTLSListener
}

// New binds the listeners (so a port clash is reported before Run).
func New(cfg Config, cert *pki.ServerCert, id bridges.Identity, sink bridges.Sink, log *slog.Logger) (*Server, error) {
	s := &Server{cfg: cfg, cert: cert, id: id, sink: sink, log: log.With("component", "coap")}
	verify := func(raw [][]byte, _ [][]*x509.Certificate) error {
		dev, err := id.VerifyCert(raw)
		if err != nil {
			s.log.Warn("coap: device certificate refused", "device", dev, "err", err)
		}
		return err
	}
	var err error
	s.lnC, err = coapnet.NewDTLSListener("udp", cfg.Listen, pki.DTLSCertServer(cert, verify))
	if err != nil {
		return nil, fmt.Errorf("coap: listen udp %s: %w", cfg.Listen, err)
	}
	if cfg.PSKListen != "" {
		psk := func(identity []byte) ([]byte, error) {
			dev, key, err := id.PSK(identity)
			if err != nil {
				s.log.Warn("coap: PSK identity refused", "device", dev, "err", err)
			}
			return key, err
		}
		s.lnP, err = coapnet.NewDTLSListener("udp", cfg.PSKListen, pki.DTLSPSKServer(psk))
		if err != nil {
			s.lnC.Close()
			return nil, fmt.Errorf("coap: listen udp %s: %w", cfg.PSKListen, err)
		}
	}
	return s, nil
}

// Addrs returns the bound addresses (certificate, PSK).
func (s *Server) Addrs() (cert, psk net.Addr) {
	if s.lnP != nil {
		psk = s.lnP.Addr()
	}
	return s.lnC.Addr(), psk
}

func (s *Server) router() *mux.Router {
	r := mux.NewRouter()
	r.Handle("/.well-known/core", mux.HandlerFunc(func(w mux.ResponseWriter, req *mux.Message) {
		if req.Code() != codes.GET {
			w.SetResponse(codes.MethodNotAllowed, message.TextPlain, nil)
			return
		}
		w.SetResponse(codes.Content, message.AppLinkFormat, bytes.NewReader([]byte(`</t>;rt="bastion.telemetry",</c>;rt="bastion.command";obs`)))
	}))
	return r
}

// Run serves until ctx ends, then closes the listeners.
func (s *Server) Run(ctx context.Context) error {
	r := s.router()
	srvs := []*server.Server{}
	lns := []*coapnet.DTLSListener{s.lnC}
	if s.lnP != nil {
		lns = append(lns, s.lnP)
	}
	errc := make(chan error, len(lns))
	for _, ln := range lns {
		srv := dtls.NewServer(options.WithMux(r), options.WithContext(ctx),
			options.WithMaxMessageSize(uint32(s.cfg.MaxPayload+1024)),
			// go-coap's default runner leaves a sleeping goroutine per
			// connection behind; this one stops with the server.
			options.WithPeriodicRunner(periodic.New(ctx.Done(), time.Second)),
			options.WithErrors(func(err error) { s.log.Debug("coap: connection error", "err", err) }))
		srvs = append(srvs, srv)
		go func() { errc <- srv.Serve(ln) }()
	}
	s.log.Info("coap: listening", "cert", s.lnC.Addr(), "psk", addrOrNone(s.lnP))
	<-ctx.Done()
	for _, srv := range srvs {
		srv.Stop()
	}
	var first error
	for range lns {
		if err := <-errc; err != nil && !errors.Is(err, net.ErrClosed) && first == nil {
			first = err
		}
	}
	return first
}

func addrOrNone(l *coapnet.DTLSListener) string {
	if l == nil {
		return "off"
	}
	return l.Addr().String()
}
