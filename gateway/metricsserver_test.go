package gateway

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
)

// tempErr is an Accept error net/http retries (and logs).
type tempErr string

func (e tempErr) Error() string { return string(e) }
func (tempErr) Timeout() bool   { return false }
func (tempErr) Temporary() bool { return true }

// flakyListener fails its first Accept with err.
type flakyListener struct {
	net.Listener
	err    error
	failed atomic.Bool
}

func (l *flakyListener) Accept() (net.Conn, error) {
	if l.failed.CompareAndSwap(false, true) {
		return nil, l.err
	}
	return l.Listener.Accept()
}

// What net/http says about the metrics server goes to the gateway's log,
// escaped, not to stderr: it used to have no ErrorLog, and net/http then
// writes to the standard logger. A malformed request makes net/http answer
// 400 without a line on a plain-HTTP server, so the line here is one it
// does write: an Accept error, which it retries, here carrying a terminal
// escape and a forged log line.
func TestMetricsServerErrorsGoToTheLog(t *testing.T) {
	lb := &logbuf.Buffer{}
	g := &Gateway{log: slog.New(slog.NewTextHandler(lb, nil)), metrics: newMetrics(func() float64 { return 0 })}
	srv := g.metricsServer()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	const forged = "level=ERROR msg=forged"
	served := make(chan error, 1)
	go func() { served <- srv.Serve(&flakyListener{Listener: ln, err: tempErr("accept4: \x1b[2J\n" + forged)}) }()
	defer func() {
		srv.Close()
		if err := <-served; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	}()

	// The scrape is accepted after the failed Accept, so its line is
	// written by the time the answer is read.
	res, err := http.Get("http://" + ln.Addr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusOK || !strings.Contains(string(body), "bastion_") {
		t.Errorf("scrape after the Accept error: %d %.200s", res.StatusCode, body)
	}
	logs := lb.String()
	var lines []string
	for l := range strings.SplitSeq(logs, "\n") {
		if strings.Contains(l, "http: Accept error") {
			lines = append(lines, l)
		}
	}
	if len(lines) != 1 || !strings.Contains(lines[0], "level=WARN") || !strings.Contains(lines[0], "component=metrics") {
		t.Fatalf("log:\n%s\nwant one warning of the metrics component with net/http's Accept error", logs)
	}
	if strings.Contains(logs, "\x1b") || strings.Contains(logs, "\n"+forged) {
		t.Errorf("log:\n%q\nwant the error's escape and newline escaped", logs)
	}
}
