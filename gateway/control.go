package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// controlServer is bastionctl's API: HTTP over a unix socket that only root
// (or the daemon's own user, in --dev) may open. The socket file is 0600 in
// the 0700 state directory, and each connection's peer credentials are
// checked as well, in case the file mode is ever loosened.
type controlServer struct {
	g    *Gateway
	path string
	ln   net.Listener
	srv  *http.Server
}

func newControlServer(g *Gateway, path string) (*controlServer, error) {
	os.Remove(path) // a stale socket from a crash; the store lock already proved we are alone
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	c := &controlServer{g: g, path: path, ln: ln}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", c.status)
	mux.HandleFunc("GET /v1/devices", c.listDevices)
	mux.HandleFunc("POST /v1/devices", c.addDevice)
	mux.HandleFunc("POST /v1/devices/{id}/revoke", c.revokeDevice)
	mux.HandleFunc("GET /v1/pki", c.pkiShow)
	mux.Handle("GET /metrics", promhttp.HandlerFor(g.metrics.reg, promhttp.HandlerOpts{}))
	g.controlFirewall(mux)
	g.controlFirmware(mux)
	g.controlUpstream(mux)
	for path, h := range g.extraControl {
		mux.Handle(path, h)
	}
	c.srv = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		ConnContext: func(ctx context.Context, conn net.Conn) context.Context {
			return context.WithValue(ctx, peerKey{}, peerAllowed(conn))
		},
		ErrorLog: slog.NewLogLogger(g.log.Handler(), slog.LevelWarn),
	}
	mux2 := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if ok, _ := r.Context().Value(peerKey{}).(bool); !ok {
			http.Error(w, "control socket: only root or the daemon's user may use it", http.StatusForbidden)
			return
		}
		mux.ServeHTTP(w, r)
	})
	c.srv.Handler = mux2
	return c, nil
}

type peerKey struct{}

func peerAllowed(conn net.Conn) bool {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return false
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return false
	}
	var cred *syscall.Ucred
	raw.Control(func(fd uintptr) {
		cred, err = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	})
	return err == nil && (cred.Uid == 0 || int(cred.Uid) == os.Geteuid())
}

func (c *controlServer) Run(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- c.srv.Serve(c.ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("control socket: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c.srv.Shutdown(sctx)
	<-errc
	os.Remove(c.path)
	return nil
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func writeErr(w http.ResponseWriter, err error) {
	code := http.StatusInternalServerError
	if errors.Is(err, ErrBadRequest) {
		code = http.StatusBadRequest
	}
	writeJSON(w, code, map[string]string{"error": err.Error()})
}

var ctlActor = Actor{Name: "bastionctl", Remote: "local socket"}

func (c *controlServer) status(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, c.g.Status())
}

func (c *controlServer) listDevices(w http.ResponseWriter, r *http.Request) {
	ds, err := c.g.devices.List()
	if err != nil {
		writeErr(w, err)
		return
	}
	for i := range ds {
		ds[i].SecretHash = "" // never leaves the daemon
	}
	writeJSON(w, http.StatusOK, ds)
}

func (c *controlServer) addDevice(w http.ResponseWriter, r *http.Request) {
	var req AddRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeErr(w, fmt.Errorf("%w: %v", ErrBadRequest, err))
		return
	}
	creds, err := c.g.devices.Add(req, ctlActor)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, creds)
}

func (c *controlServer) revokeDevice(w http.ResponseWriter, r *http.Request) {
	d, err := c.g.devices.Revoke(r.PathValue("id"), ctlActor)
	if err != nil {
		writeErr(w, err)
		return
	}
	d.SecretHash = ""
	writeJSON(w, http.StatusOK, d)
}

func (c *controlServer) pkiShow(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, c.g.PKIInfo())
}
