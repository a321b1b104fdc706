// Package benchgoals reads the output of the side-by-side benchmarks
// (go test -bench with -count N) and reports, for every goal the issues set,
// the rounds it was measured in, the minimum, median and maximum, and in how
// many rounds it was met. scripts/bench feeds it; it never runs anything
// itself, and a goal with no measurement is reported as such, not as met.
package benchgoals

import (
	"bufio"
	"fmt"
	"io"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Goal is one number an issue names: Metric of the benchmarks whose name
// matches Bench must be at least (AtLeast) or at most Limit.
type Goal struct {
	What    string // what a reader calls it
	Bench   *regexp.Regexp
	Metric  string
	AtLeast bool
	Limit   float64
}

func (g Goal) met(v float64) bool {
	if g.AtLeast {
		return v >= g.Limit
	}
	return v <= g.Limit
}

func (g Goal) String() string {
	op := "≤"
	if g.AtLeast {
		op = "≥"
	}
	return fmt.Sprintf("%s %s", op, strconv.FormatFloat(g.Limit, 'f', -1, 64))
}

func goal(what, bench, metric string, atLeast bool, limit float64) Goal {
	return Goal{What: what, Bench: regexp.MustCompile(bench), Metric: metric, AtLeast: atLeast, Limit: limit}
}

// Goals are the numbers of issues #3 (device transports), #4 (upstream),
// #5 (firewall) and the firmware cache's, with the metric each benchmark
// reports for them.
var Goals = []Goal{
	goal("MQTT QoS 0, 1 publisher: throughput / Mosquitto", `^BenchmarkMQTTvsMosquitto/qos0/pubs1$`, "throughput_ratio", true, 1),
	goal("MQTT QoS 0, 1 publisher, mosquitto_pub as the client: throughput / Mosquitto", `^BenchmarkMQTTvsMosquitto/qos0/pubs1/mosquitto_pub$`, "throughput_ratio", true, 1),
	goal("MQTT QoS 0, 50 publishers: throughput / Mosquitto", `^BenchmarkMQTTvsMosquitto/qos0/pubs50$`, "throughput_ratio", true, 1),
	goal("MQTT QoS 1, 1 publisher: throughput / Mosquitto", `^BenchmarkMQTTvsMosquitto/qos1/pubs1$`, "throughput_ratio", true, 1),
	goal("MQTT QoS 1, 1 publisher: p99 / Mosquitto", `^BenchmarkMQTTvsMosquitto/qos1/pubs1$`, "p99_ratio", false, 1),
	goal("MQTT QoS 1, 50 publishers: throughput / Mosquitto", `^BenchmarkMQTTvsMosquitto/qos1/pubs50$`, "throughput_ratio", true, 1),
	goal("MQTT QoS 1, 50 publishers: p99 / Mosquitto", `^BenchmarkMQTTvsMosquitto/qos1/pubs50$`, "p99_ratio", false, 1),
	goal("CoAP/DTLS request/response, 1 session / libcoap", `^BenchmarkCoAPvsLibcoap/request/sessions1$`, "throughput_ratio", true, 1),
	goal("CoAP/DTLS request/response, 10 sessions / libcoap", `^BenchmarkCoAPvsLibcoap/request/sessions10$`, "throughput_ratio", true, 1),
	goal("DTLS PSK handshakes/s / libcoap", `^BenchmarkCoAPvsLibcoap/handshakes$`, "ratio", true, 1),
	goal("RSS with 10,000 idle devices, MiB", `^BenchmarkIdleRSS$`, "rss_MiB", false, 256),
	goal("full stack, 1 device, 1 in flight: throughput / Mosquitto bridge", `^BenchmarkFullStack$`, "bastion-tput-ratio-1pub", true, 1),
	goal("full stack, 1 device, 1 in flight: e2e p99, µs", `^BenchmarkFullStack$`, "bastion-p99-µs-1pub", false, 5000),
	goal("full stack, 1 device, 16 in flight: throughput / Mosquitto bridge", `^BenchmarkFullStack$`, "bastion-tput-ratio-1pubx16", true, 1),
	goal("full stack, 1 device, 16 in flight: e2e p99, µs", `^BenchmarkFullStack$`, "bastion-p99-µs-1pubx16", false, 5000),
	goal("full stack, 50 devices: throughput / Mosquitto bridge", `^BenchmarkFullStack$`, "bastion-tput-ratio-50pub", true, 1),
	goal("full stack, 50 devices: e2e p99, µs", `^BenchmarkFullStack$`, "bastion-p99-µs-50pub", false, 5000),
	goal("full stack, 50 devices paced at 10,000 msg/s: e2e p99, µs", `^BenchmarkFullStack$`, "bastion-p99-µs-50paced", false, 5000),
	goal("firewall: apply 100 rules, ms", `^BenchmarkApply100Rules$`, "bastion-ms/apply", false, 100),
	goal("firmware to 100 CoAPS devices / libcoap", `^BenchmarkCoAPSServe$`, "ratio", true, 1),
	goal("firmware serving: RSS growth, MiB", `^BenchmarkCoAPSServe$`, "bastion-RSS-growth-MiB", false, 64),
}

// Results holds every value of every metric, by benchmark name (without
// the -GOMAXPROCS suffix) and metric unit, in the order read.
type Results map[string]map[string][]float64

var procSuffix = regexp.MustCompile(`-\d+$`)

// Parse reads go test -bench output. A result line is the benchmark's
// name, its iteration count, then value/unit pairs; everything else (logs,
// PASS, ok) is skipped. A line that starts like a result but does not
// parse is an error naming its line number.
func Parse(r io.Reader) (Results, error) {
	res := Results{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		f := strings.Fields(sc.Text())
		if len(f) < 2 || !strings.HasPrefix(f[0], "Benchmark") {
			continue
		}
		if _, err := strconv.Atoi(f[1]); err != nil {
			continue // "BenchmarkX ... --- FAIL" and similar
		}
		if len(f)%2 != 0 {
			return nil, fmt.Errorf("line %d: %q: value without a unit", n, sc.Text())
		}
		name := procSuffix.ReplaceAllString(f[0], "")
		if res[name] == nil {
			res[name] = map[string][]float64{}
		}
		for i := 2; i < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				return nil, fmt.Errorf("line %d: metric %s: %w", n, f[i+1], err)
			}
			res[name][f[i+1]] = append(res[name][f[i+1]], v)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read benchmark output: %w", err)
	}
	return res, nil
}

// Verdict is one goal against its measurements.
type Verdict struct {
	Goal             Goal
	Values           []float64 // every round's value
	Min, Median, Max float64
	Met              int // rounds meeting the goal
}

// Measured reports whether the goal's benchmark ran.
func (v Verdict) Measured() bool { return len(v.Values) > 0 }

// MedianMeets reports whether the median reaches the goal.
func (v Verdict) MedianMeets() bool { return v.Measured() && v.Goal.met(v.Median) }

// Judge evaluates every goal against res. Goals whose benchmark did not
// run come back with no values (Measured false).
func Judge(res Results, goals []Goal) []Verdict {
	var out []Verdict
	for _, g := range goals {
		v := Verdict{Goal: g}
		names := make([]string, 0, len(res))
		for name := range res {
			if g.Bench.MatchString(name) {
				names = append(names, name)
			}
		}
		slices.Sort(names)
		for _, name := range names {
			v.Values = append(v.Values, res[name][g.Metric]...)
		}
		if v.Measured() {
			s := slices.Clone(v.Values)
			slices.Sort(s)
			v.Min, v.Max = s[0], s[len(s)-1]
			if len(s)%2 == 1 {
				v.Median = s[len(s)/2]
			} else {
				v.Median = (s[len(s)/2-1] + s[len(s)/2]) / 2
			}
			for _, x := range v.Values {
				if g.met(x) {
					v.Met++
				}
			}
		}
		out = append(out, v)
	}
	return out
}

// Write prints the measured verdicts as a Markdown table, one goal per row,
// and then names the goals this run did not measure.
func Write(w io.Writer, vs []Verdict) error {
	bw := bufio.NewWriter(w)
	fmt.Fprintln(bw, "| goal | rounds | min | median | max | target | met in |")
	fmt.Fprintln(bw, "|---|---|---|---|---|---|---|")
	var absent []string
	for _, v := range vs {
		if !v.Measured() {
			absent = append(absent, v.Goal.What)
			continue
		}
		verdict := fmt.Sprintf("%d of %d", v.Met, len(v.Values))
		switch {
		case v.Met == len(v.Values):
			verdict += " (met)"
		case v.MedianMeets():
			verdict += " (median meets)"
		default:
			verdict += " (not met)"
		}
		fmt.Fprintf(bw, "| %s | %d | %s | %s | %s | %s | %s |\n", v.Goal.What, len(v.Values),
			num(v.Min), num(v.Median), num(v.Max), v.Goal, verdict)
	}
	if len(absent) > 0 {
		fmt.Fprintf(bw, "\nNot measured in this run: %s.\n", strings.Join(absent, "; "))
	}
	return bw.Flush()
}

func num(v float64) string {
	if v >= 100 {
		return strconv.FormatFloat(v, 'f', 0, 64)
	}
	return strconv.FormatFloat(v, 'f', 2, 64)
}
