package gateway

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A metrics.listen whose port is taken stops New with an error naming the
// key and the address, like any other listener, and leaves nothing
// running: the same state directory starts afterwards. It used to be
// bound in Run, after every component had started; Run then returned the
// error without stopping them, and its deferred close shut the store and
// the queues under them. And when a later step of New fails, the metrics
// port is let go.
func TestMetricsListenTakenStopsNew(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	os.MkdirAll(dir, 0o700)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	cfg := testConfig(dir)
	cfg.Metrics.Listen = taken.Addr().String()
	path := filepath.Join(dir, "bastion.yaml")
	if err := WriteConfigFile(path, cfg); err != nil {
		t.Fatal(err)
	}
	opts := Options{Dev: true, StateDir: dir, Log: discard, Out: &bytes.Buffer{}}
	g, err := New(opts)
	if err == nil {
		r := runGatewayFrom(t, g, 10*time.Second)
		r.cancel()
		<-r.done
		t.Fatal("New succeeded with metrics.listen on a port in use")
	}
	if want := "metrics.listen " + cfg.Metrics.Listen; !strings.Contains(err.Error(), want) {
		t.Errorf("New: %v, want an error naming %q", err, want)
	}

	// A later step fails (the MQTT port is the taken one): the metrics
	// port New had bound is free again. Without CoAP, whose listeners a
	// failed New does not close (it has no Close).
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Metrics.Listen = free.Addr().String()
	free.Close()
	cfg.MQTT.Listen = taken.Addr().String()
	cfg.CoAP.Enabled = false
	if err := WriteConfigFile(path, cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := New(opts); err == nil || !strings.Contains(err.Error(), "mqtt") {
		t.Fatalf("New with the MQTT port in use: %v, want an error about MQTT", err)
	}
	if ln, err := net.Listen("tcp", cfg.Metrics.Listen); err != nil {
		t.Errorf("the metrics port after New failed: %v, want it free", err)
	} else {
		ln.Close()
	}

	// Nothing of the failed starts holds the state: it starts, and serves
	// metrics.
	cfg.MQTT.Listen = "127.0.0.1:0"
	if err := WriteConfigFile(path, cfg); err != nil {
		t.Fatal(err)
	}
	r := runGateway(t, opts, 10*time.Second)
	defer r.stop(t)
	c, err := net.Dial("tcp", cfg.Metrics.Listen)
	if err != nil {
		t.Fatalf("metrics after a clean start: %v", err)
	}
	c.Close()
}
