package benchgoals

import (
	"bytes"
	"os"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParse(t *testing.T) {
	f, err := os.Open("testdata/sample.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := Parse(f)
	if err != nil {
		t.Fatal(err)
	}
	// testdata/sample.txt is scripts/bench's coap and fullstack output of
	// 2026-11-25 21:52 UTC, as written.
	if diff := cmp.Diff([]float64{1.024, 0.9547, 0.8845, 0.964, 0.8496}, res["BenchmarkCoAPvsLibcoap/handshakes"]["ratio"]); diff != "" {
		t.Errorf("handshake ratios (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]float64{5900, 5230, 6770, 6340, 7610}, res["BenchmarkFullStack"]["bastion-p99-µs-50pub"]); diff != "" {
		t.Errorf("full-stack p99 (-want +got):\n%s", diff)
	}
	if _, ok := res["BenchmarkFullStack-2"]; ok {
		t.Error("the -GOMAXPROCS suffix was kept in a name")
	}
}

func TestParseRefusesAValueWithoutUnit(t *testing.T) {
	_, err := Parse(strings.NewReader("ok\nBenchmarkX-2 1 100 ns/op 0.5\n"))
	if err == nil || !strings.Contains(err.Error(), "line 2") {
		t.Fatalf("Parse: %v, want an error naming line 2", err)
	}
}

func TestJudge(t *testing.T) {
	res := Results{
		"BenchmarkCoAPvsLibcoap/handshakes": {"ratio": {0.8448, 1.065, 1.027}},
		"BenchmarkIdleRSS":                  {"rss_MiB": {219.7, 260}},
		"BenchmarkFullStack":                {"bastion-p99-µs-50pub": {6390, 5400, 4900, 5100}},
	}
	goals := []Goal{
		goal("hs", `^BenchmarkCoAPvsLibcoap/handshakes$`, "ratio", true, 1),
		goal("rss", `^BenchmarkIdleRSS$`, "rss_MiB", false, 256),
		goal("p99", `^BenchmarkFullStack$`, "bastion-p99-µs-50pub", false, 5000),
		goal("absent", `^BenchmarkNone$`, "x", true, 1),
	}
	got := Judge(res, goals)
	type short struct {
		Met              int
		Min, Median, Max float64
		MedianMeets      bool
		Measured         bool
	}
	var gs []short
	for _, v := range got {
		gs = append(gs, short{v.Met, v.Min, v.Median, v.Max, v.MedianMeets(), v.Measured()})
	}
	want := []short{
		{2, 0.8448, 1.027, 1.065, true, true},
		{1, 219.7, 239.85, 260, true, true},
		{1, 4900, 5250, 6390, false, true},
		{0, 0, 0, 0, false, false},
	}
	if diff := cmp.Diff(want, gs); diff != "" {
		t.Errorf("verdicts (-want +got):\n%s", diff)
	}
	var out bytes.Buffer
	if err := Write(&out, got); err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{
		"| hs | 3 | 0.84 | 1.03 | 1.06 | ≥ 1 | 2 of 3 (median meets) |",
		"| p99 | 4 | 4900 | 5250 | 6390 | ≤ 5000 | 1 of 4 (not met) |",
		"\nNot measured in this run: absent.",
	} {
		if !strings.Contains(out.String(), line+"\n") {
			t.Errorf("table lacks %q:\n%s", line, out.String())
		}
	}
}

// Every goal names a benchmark and metric that exists: a renamed metric
// would otherwise leave its goal "not measured" for ever.
func TestGoalsNameReportedMetrics(t *testing.T) {
	src := map[string]string{
		"BenchmarkMQTTvsMosquitto": "../../bridges/bench/mqtt_test.go",
		"BenchmarkCoAPvsLibcoap":   "../../bridges/bench/coap_test.go",
		"BenchmarkIdleRSS":         "../../bridges/bench/rss_test.go",
		"BenchmarkFullStack":       "../../integration/powercut/bench_test.go",
		"BenchmarkApply100Rules":   "../../firewall/bench_test.go",
		"BenchmarkCoAPSServe":      "../../ota-cache/bench_test.go",
	}
	for _, g := range Goals {
		var file string
		for bench, f := range src {
			if strings.Contains(g.Bench.String(), bench) {
				file = f
			}
		}
		if file == "" {
			t.Errorf("goal %q: no benchmark source known for %s", g.What, g.Bench)
			continue
		}
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		metric := g.Metric
		// The full-stack metrics are prefix + "-…-" + scenario name.
		if i := strings.Index(metric, "-"); strings.Contains(g.Bench.String(), "FullStack") && i > 0 {
			rest := metric[i:] // "-tput-ratio-1pubx16"
			metric = rest[:strings.LastIndex(rest, "-")+1]
		}
		// The whole quoted name: "ratio" must not be found inside
		// "baseline_ratio".
		if !bytes.Contains(b, []byte(`"`+metric+`"`)) {
			t.Errorf("goal %q: %s does not report %q", g.What, file, metric)
		}
	}
}
