package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/gateway"
)

// qosSink records the QoS of each message the gateway hands it.
type qosSink struct {
	mu  sync.Mutex
	qos []byte
}

func (s *qosSink) Accept(_ context.Context, m bridges.Message) error {
	s.mu.Lock()
	s.qos = append(s.qos, m.QoS)
	s.mu.Unlock()
	return nil
}

func (s *qosSink) take() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	q := s.qos
	s.qos = nil
	return q
}

// --coap --qos 0 publishes non-confirmable (the gateway's Sink sees QoS
// 0), --qos 1 confirmable (QoS 1), and any other QoS is refused. Before,
// runCoAP ignored --qos and every request was confirmable.
func TestCoAPPublishQoS(t *testing.T) {
	sink := &qosSink{}
	g := startGatewaySink(t, filepath.Join(t.TempDir(), "state"), nil, sink)
	pc, err := g.Devices().Add(gateway.AddRequest{Name: "sim-qos", Auth: "psk"}, gateway.Actor{Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(pc)
	creds := filepath.Join(t.TempDir(), "psk.json")
	if err := os.WriteFile(creds, b, 0o600); err != nil {
		t.Fatal(err)
	}
	addr := g.Addrs()["coaps_psk"]
	for _, qos := range []string{"0", "1"} {
		var out, errb bytes.Buffer
		// The NON request is answered too (NON 2.04), after the Sink
		// took it: when run returns, the Sink has it.
		if rc := run([]string{"--coap", "--creds", creds, "--addr", addr, "--qos", qos, "publish", "temp", "21"}, &out, &errb); rc != 0 {
			t.Fatalf("--qos %s: exit %d: %s", qos, rc, errb.String())
		}
		if got := sink.take(); len(got) != 1 || got[0] != qos[0]-'0' {
			t.Errorf("--qos %s: the Sink saw QoS %v, want [%s]", qos, got, qos)
		}
	}
	var out, errb bytes.Buffer
	if rc := run([]string{"--coap", "--creds", creds, "--addr", addr, "--qos", "2", "publish", "temp", "21"}, &out, &errb); rc != 1 || !strings.Contains(errb.String(), "--qos 2") {
		t.Errorf("--qos 2: exit %d, stderr %q; want 1 naming --qos 2", rc, errb.String())
	}
}
