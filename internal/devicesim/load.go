package devicesim

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

// LoadOptions bound a load run: both a count and a time limit, always.
type LoadOptions struct {
	Count int           // messages (default 1)
	Rate  float64       // messages per second; 0 = as fast as acknowledged
	Limit time.Duration // wall-clock bound (default 1 min)
}

// LoadResult is what a load run measured.
type LoadResult struct {
	Sent, OK, Refused int
	Elapsed           time.Duration
	Latencies         []time.Duration // sorted, one per acknowledged message
}

// Percentile returns the p-th percentile (0..100) latency.
func (r LoadResult) Percentile(p float64) time.Duration {
	if len(r.Latencies) == 0 {
		return 0
	}
	i := int(float64(len(r.Latencies)-1) * p / 100)
	return r.Latencies[i]
}

// Throughput is acknowledged messages per second.
func (r LoadResult) Throughput() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.OK) / r.Elapsed.Seconds()
}

// ErrRefused is returned by a send function for a message the gateway
// refused (queue full, not authorised); the run goes on.
var ErrRefused = errors.New("refused by the gateway")

// Load calls send(ctx, i) for i in [0, Count) at Rate, until Count or Limit.
// A run that gets fewer than Count messages acknowledged fails: with the
// first error send returned, or else with one saying how many were refused
// and how many were never sent (Limit ran out, or ctx ended).
func Load(ctx context.Context, o LoadOptions, send func(ctx context.Context, i int) error) (LoadResult, error) {
	if o.Count <= 0 {
		o.Count = 1
	}
	if o.Limit <= 0 {
		o.Limit = time.Minute
	}
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, o.Limit)
	defer cancel()
	var r LoadResult
	var interval time.Duration
	if o.Rate > 0 {
		interval = time.Duration(float64(time.Second) / o.Rate)
	}
	start := time.Now()
	var err error
	for i := 0; i < o.Count; i++ {
		if interval > 0 {
			next := start.Add(time.Duration(i) * interval)
			if d := time.Until(next); d > 0 {
				select {
				case <-ctx.Done():
				case <-time.After(d):
				}
			}
		}
		if ctx.Err() != nil {
			break
		}
		t0 := time.Now()
		e := send(ctx, i)
		r.Sent++
		switch {
		case e == nil:
			r.OK++
			r.Latencies = append(r.Latencies, time.Since(t0))
		case errors.Is(e, ErrRefused):
			r.Refused++
		default:
			err = e
		}
		if err != nil {
			break
		}
	}
	r.Elapsed = time.Since(start)
	slices.Sort(r.Latencies)
	if err == nil && r.OK < o.Count {
		var why []string
		if r.Refused > 0 {
			why = append(why, fmt.Sprintf("%d refused by the gateway", r.Refused))
		}
		if n := o.Count - r.Sent; n > 0 {
			ended := fmt.Sprintf("the %v limit ran out", o.Limit)
			if parent.Err() != nil {
				ended = "stopped"
			}
			why = append(why, fmt.Sprintf("%d not sent (%s)", n, ended))
		}
		err = fmt.Errorf("%d of %d messages acknowledged: %s", r.OK, o.Count, strings.Join(why, ", "))
	}
	return r, err
}
