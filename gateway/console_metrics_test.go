package gateway

import (
	"crypto/tls"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/gateway/console"
	"github.com/bastion-iot/bastion/gateway/control"
)

// Console refusals reach the gateway's metrics: what `bastionctl metrics`
// prints (the control socket's /metrics) counts a refused console request.
func TestConsoleRefusalsInGatewayMetrics(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	r := start(t, dir, nil)
	defer r.stop(t)
	ctl := control.New(control.SocketPath(dir))
	metric := func(t *testing.T, reason string) string {
		t.Helper()
		raw, err := ctl.Do(ctxT(t, 10*time.Second), "GET", "/metrics", nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(string(raw), "\n") {
			if strings.HasPrefix(l, `bastion_console_refusals_total{reason="`+reason+`"} `) {
				return l
			}
		}
		t.Fatalf("no bastion_console_refusals_total{reason=%q} in:\n%s", reason, raw)
		return ""
	}
	want0 := `bastion_console_refusals_total{reason="unauthenticated"} 0`
	if got := metric(t, console.ReasonUnauthenticated); got != want0 {
		t.Errorf("before: %q, want %q", got, want0)
	}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: r.g.CA().RootPool(), ServerName: "127.0.0.1"}}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Get("https://" + r.g.Addrs()["console"] + "/api/v1/devices")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("console API without auth: %s, want 401", resp.Status)
	}
	want1 := `bastion_console_refusals_total{reason="unauthenticated"} 1`
	if got := metric(t, console.ReasonUnauthenticated); got != want1 {
		t.Errorf("after: %q, want %q", got, want1)
	}
}
