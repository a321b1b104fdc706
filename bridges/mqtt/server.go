// Package mqtt terminates MQTT 3.1.1 and 5 over TLS from devices with an
// embedded mochi-mqtt broker. A client certificate (or, where allowed, a
// per-device secret over TLS) proves the device; the MQTT client id must be
// that device's id, and a device may publish and subscribe only inside
// devices/{id}/. There is no cleartext listener.
package mqtt

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/pki"
)

// Config is what the server needs from the gateway configuration.
type Config struct {
	Listen          string
	AllowSecretAuth bool
	MaxPacketSize   int
}

// BroadcastPrefix is the gateway-owned topic tree every device may read.
const BroadcastPrefix = "bastion/broadcast/"

// Server is the MQTT-over-TLS front end.
type Server struct {
	cfg  Config
	id   bridges.Identity
	log  *slog.Logger
	mq   *mochi.Server
	tcp  *listeners.TCP
	mu   sync.Mutex
	addr string
}

// New builds the broker and binds its TLS listener.
func New(cfg Config, cert *pki.ServerCert, id bridges.Identity, log *slog.Logger) (*Server, error) {
	s := &Server{cfg: cfg, id: id, log: log.With("component", "mqtt")}
	caps := mochi.NewDefaultServerCapabilities()
	caps.MaximumPacketSize = uint32(cfg.MaxPacketSize)
	s.mq = mochi.New(&mochi.Options{
		Capabilities: caps,
		InlineClient: true,
		Logger:       s.log.With("lib", "mochi"),
	})
	if err := s.mq.AddHook(&authHook{s: s}, nil); err != nil {
		return nil, err
	}
	clientAuth := tls.RequireAnyClientCert
	if cfg.AllowSecretAuth {
		clientAuth = tls.RequestClientCert
	}
	verify := func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 {
			return nil // secret login; checked at CONNECT
		}
		dev, err := id.VerifyCert(raw)
		if err != nil {
			s.log.Warn("mqtt: device certificate refused", "device", dev, "err", err)
		}
		return err
	}
	s.tcp = listeners.NewTCP(listeners.Config{Type: "tcp", ID: "tls", Address: cfg.Listen,
		TLSConfig: pki.TLSServer(cert, clientAuth, verify)})
	if err := s.mq.AddListener(s.tcp); err != nil {
		return nil, fmt.Errorf("mqtt: listen tcp %s: %w", cfg.Listen, err)
	}
	id.OnRevoke(s.disconnect)
	return s, nil
}

// Addr returns the bound address.
func (s *Server) Addr() string { return s.tcp.Address() }

// Broker is the embedded broker, for the gateway's own inline publishing.
func (s *Server) Broker() *mochi.Server { return s.mq }

// Run serves until ctx ends.
func (s *Server) Run(ctx context.Context) error {
	if err := s.mq.Serve(); err != nil {
		return fmt.Errorf("mqtt: serve: %w", err)
	}
	s.log.Info("mqtt: listening", "addr", s.Addr())
	<-ctx.Done()
	return s.mq.Close()
}

func (s *Server) disconnect(device string) {
	if cl, ok := s.mq.Clients.Get(device); ok && !cl.Closed() {
		s.log.Info("mqtt: closing session of revoked device", "device", device)
		s.mq.DisconnectClient(cl, packets.ErrNotAuthorized)
	}
}

// deviceOf returns the device a connection proved, from its certificate.
func deviceOf(id bridges.Identity, cl *mochi.Client) (string, bool, error) {
	tc, ok := cl.Net.Conn.(*tls.Conn)
	if !ok {
		return "", false, errors.New("not a TLS connection")
	}
	st := tc.ConnectionState()
	if len(st.PeerCertificates) == 0 {
		return "", false, nil
	}
	raw := make([][]byte, len(st.PeerCertificates))
	for i, c := range st.PeerCertificates {
		raw[i] = c.Raw
	}
	dev, err := id.VerifyCert(raw)
	return dev, true, err
}

type authHook struct {
	mochi.HookBase
	s *Server
}

func (h *authHook) ID() string { return "bastion-auth" }

func (h *authHook) Provides(b byte) bool {
	return bytes.Contains([]byte{mochi.OnConnectAuthenticate, mochi.OnACLCheck}, []byte{b})
}

// OnConnectAuthenticate binds the MQTT client id to the proven identity.
func (h *authHook) OnConnectAuthenticate(cl *mochi.Client, pk packets.Packet) bool {
	log := h.s.log.With("remote", cl.Net.Remote, "client_id", cl.ID)
	dev, hasCert, err := deviceOf(h.s.id, cl)
	switch {
	case err != nil:
		log.Warn("mqtt: connect refused: certificate not accepted", "device", dev, "err", err)
		return false
	case hasCert:
	case h.s.cfg.AllowSecretAuth && len(pk.Connect.Username) > 0:
		dev = string(pk.Connect.Username)
		if err := h.s.id.CheckSecret(dev, pk.Connect.Password); err != nil {
			log.Warn("mqtt: connect refused: secret login failed", "device", dev, "err", err)
			return false
		}
	default:
		log.Warn("mqtt: connect refused: no client certificate")
		return false
	}
	if cl.ID != dev {
		log.Warn("mqtt: connect refused: client id is not the authenticated device", "device", dev)
		return false
	}
	log.Info("mqtt: device connected", "device", dev)
	return true
}

// OnACLCheck keeps a device inside devices/{id}/, plus read-only broadcasts.
func (h *authHook) OnACLCheck(cl *mochi.Client, topic string, write bool) bool {
	if strings.HasPrefix(topic, bridges.TopicPrefix(cl.ID)) {
		return true
	}
	if !write && strings.HasPrefix(topic, BroadcastPrefix) {
		return true
	}
	h.s.log.Warn("mqtt: topic outside the device namespace refused", "device", cl.ID, "topic", topic, "write", write)
	return false
}
