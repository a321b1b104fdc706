package upstream

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/testutil/child"
	"github.com/bastion-iot/bastion/internal/testutil/mosquitto"
	"github.com/prometheus/client_golang/prometheus"
)

const childEnv = "BASTION_UPSTREAM_CHILD"

type childArgs struct {
	Config   Config
	QueueDir string
	Total    int
	Devices  int
}

// childMain is the gateway process of the power-cut test: queue + upstream
// link (whose broker is down), Accepting QoS 1 messages and printing
// "device index" for each one Accept acknowledged, until SIGKILL.
func childMain() int {
	var a childArgs
	if err := json.Unmarshal([]byte(os.Getenv(childEnv)), &a); err != nil {
		fmt.Fprintln(os.Stderr, "child args:", err)
		return 2
	}
	q, err := queue.Open(a.QueueDir, queue.Options{}, testLog(), prometheus.NewRegistry())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	up, err := New(a.Config, q, nil, testLog(), prometheus.NewRegistry())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	go up.Run(context.Background())
	out := bufio.NewWriter(os.Stdout)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for d := range a.Devices {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dev := "dev" + strconv.Itoa(d)
			for i := d; i < a.Total; i += a.Devices {
				if err := up.Accept(context.Background(), telemetry(dev, i)); err != nil {
					fmt.Fprintln(os.Stderr, "accept:", err)
					return
				}
				mu.Lock()
				fmt.Fprintf(out, "%d\n", i)
				out.Flush()
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	select {} // wait for the SIGKILL like a daemon would
}

// TestOutageAndPowerCut: Mosquitto is down; a gateway process accepts
// 10,000 QoS 1 messages and is SIGKILLed in the middle; a new gateway
// process state (queue + link) starts, Mosquitto comes back, and every
// message the child saw acknowledged arrives upstream at least once.
func TestOutageAndPowerCut(t *testing.T) {
	powerCut(t, true)
}

// TestPowerCutWhileDraining: the same with the broker up, so the SIGKILL
// lands while publishes await their PUBACK; those are sent again after the
// restart (the duplicates at-least-once allows).
func TestPowerCutWhileDraining(t *testing.T) {
	powerCut(t, false)
}

func powerCut(t *testing.T, outage bool) {
	const total, devices = 10000, 8
	b := mosquitto.Start(t, mosquitto.Options{Persistent: true})
	// The cloud subscriber's session survives the broker restart, so it
	// gets everything published while it reconnects.
	sub := mosquitto.Subscribe(t, b, "cloud-sub", "bastion/gw1/#", true)
	if outage {
		b.Stop(t)
	}

	cfg := linkConfig(t, b, "gw1")
	qdir := t.TempDir()
	args, _ := json.Marshal(childArgs{Config: cfg, QueueDir: qdir, Total: total, Devices: devices})
	cmd := child.DieWithTest(exec.Command(os.Args[0], "-test.run=^$"))
	cmd.Env = append(os.Environ(), childEnv+"="+string(args))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	acked := map[int]bool{}
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		i, err := strconv.Atoi(sc.Text())
		if err != nil {
			t.Fatalf("child printed %q", sc.Text())
		}
		acked[i] = true
		if len(acked) == total/2 {
			cmd.Process.Signal(syscall.SIGKILL)
			break
		}
	}
	io.Copy(io.Discard, stdout)
	cmd.Wait()
	if len(acked) < total/2 {
		t.Fatalf("child acknowledged only %d messages before dying on its own", len(acked))
	}

	// Restart: queue + link first (the broker is still down, so it retries
	// with backoff), then the broker.
	l := startLink(t, cfg, qdir)
	held := l.q.Stats().Depth
	if outage {
		b.Start(t)
	}

	got := map[int]int{}
	received := 0
	lastPerDev := map[string]int{}
	orderViolations := 0
	deadline := time.After(120 * time.Second)
	for missing := len(acked); missing > 0; {
		select {
		case p := <-sub.Got:
			var v struct {
				Dev string
				I   int
			}
			if err := json.Unmarshal(p.Payload, &v); err != nil {
				t.Fatalf("payload %q: %v", p.Payload, err)
			}
			received++
			got[v.I]++
			if got[v.I] == 1 {
				if last, ok := lastPerDev[v.Dev]; ok && v.I < last {
					orderViolations++
				}
				lastPerDev[v.Dev] = v.I
				if acked[v.I] {
					missing--
				}
			}
		case <-deadline:
			n := 0
			for i := range acked {
				if got[i] == 0 {
					n++
				}
			}
			t.Fatalf("%d of %d acknowledged messages never arrived upstream; status %+v, queue %+v", n, len(acked), l.up.Status(), l.q.Stats())
		}
	}
	waitFor(t, "queue drained", 30*time.Second, func() bool { return l.q.Stats().Depth == 0 })
	// Drain what is still in flight to count duplicates honestly.
	for quiet := false; !quiet; {
		select {
		case p := <-sub.Got:
			var v struct{ I int }
			json.Unmarshal(p.Payload, &v)
			received++
			got[v.I]++
		case <-time.After(500 * time.Millisecond):
			quiet = true
		}
	}
	dups := received - len(got)
	t.Logf("child acknowledged %d of %d before SIGKILL; queue held %d after restart; upstream received %d (%d distinct, %d duplicates, %d extra beyond the acknowledged); order violations per device: %d",
		len(acked), total, held, received, len(got), dups, len(got)-len(acked), orderViolations)
	if orderViolations > 0 {
		t.Errorf("%d messages arrived out of order for their device", orderViolations)
	}
}
