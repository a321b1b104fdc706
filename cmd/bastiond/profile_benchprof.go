//go:build benchprof

package main

import (
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"runtime/pprof"
	"runtime/trace"
	"strconv"
	"strings"
	"syscall"
)

// Only in binaries built with -tags benchprof (bridges/bench builds one when
// BENCH_PROFILE_DIR is set): on SIGUSR1 write heap and goroutine profiles
// and the runtime's memory statistics to $BASTIOND_PROFILE_DIR; SIGUSR2
// starts and stops a CPU profile there. Nothing is
// reachable over the network; the production binary has none of this.
func init() {
	dir := os.Getenv("BASTIOND_PROFILE_DIR")
	if dir == "" {
		return
	}
	// BASTIOND_MEMPROFILE_RATE=1 records every allocation: the default rate
	// (one sample per 512 KiB) cannot attribute the few KiB an idle session
	// holds, but recording all of them slows the daemon several times.
	if r, err := strconv.Atoi(os.Getenv("BASTIOND_MEMPROFILE_RATE")); err == nil && r > 0 {
		runtime.MemProfileRate = r
	}
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGUSR1, syscall.SIGUSR2)
	go func() {
		var cpu *os.File
		for sig := range ch {
			var err error
			if sig == syscall.SIGUSR2 {
				cpu, err = toggleCPUProfile(dir, cpu)
			} else {
				err = writeProfiles(dir)
			}
			if err != nil {
				fmt.Fprintf(os.Stderr, "bastiond: profiles: %v\n", err)
			}
		}
	}()
}

// toggleCPUProfile starts a CPU profile into dir/cpu-<name>.pprof, name
// read from dir/cpu.name, or stops the running one and then writes
// dir/cpu.done (the benchmark waits for it). Around it, the allocation
// profile (cumulative since start) is written as allocs-<name>-base.pprof
// and allocs-<name>.pprof, so that
//
//	go tool pprof -sample_index=alloc_space -base allocs-<name>-base.pprof bastiond allocs-<name>.pprof
//
// shows what the profiled stretch allocated (BASTIOND_MEMPROFILE_RATE
// sets the sampling; the default, one sample per 512 KiB, is coarse).
func toggleCPUProfile(dir string, running *os.File) (*os.File, error) {
	raw, err := os.ReadFile(filepath.Join(dir, "cpu.name"))
	if err != nil {
		return nil, err
	}
	name := strings.TrimSpace(string(raw))
	if running != nil {
		pprof.StopCPUProfile()
		err := running.Close()
		if tf := tracing; tf != nil {
			tracing = nil
			trace.Stop()
			if cerr := tf.Close(); err == nil {
				err = cerr
			}
		}
		if werr := writeAllocs(filepath.Join(dir, "allocs-"+name+".pprof")); err == nil {
			err = werr
		}
		if werr := os.WriteFile(filepath.Join(dir, "cpu.done"), nil, 0o600); err == nil {
			err = werr
		}
		return nil, err
	}
	if err := writeAllocs(filepath.Join(dir, "allocs-"+name+"-base.pprof")); err != nil {
		return nil, err
	}
	f, err := os.Create(filepath.Join(dir, "cpu-"+name+".pprof"))
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, err
	}
	// BASTIOND_TRACE=1: an execution trace of the same stretch,
	// trace-<name>.out, for where a message waits (go tool trace
	// -pprof=sched|sync|syscall|net).
	if os.Getenv("BASTIOND_TRACE") != "" {
		tf, err := os.Create(filepath.Join(dir, "trace-"+name+".out"))
		if err != nil {
			return f, err
		}
		if err := trace.Start(tf); err != nil {
			tf.Close()
			return f, err
		}
		tracing = tf
	}
	return f, nil
}

// tracing is the running execution trace's file (only the signal
// goroutine touches it).
var tracing *os.File

func writeAllocs(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	err = pprof.Lookup("allocs").WriteTo(f, 0)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func writeProfiles(dir string) error {
	// Each GC halves the stacks that use less than a quarter of theirs:
	// the StackInuse after each of a few GCs shows how much is shrinkable.
	var ms runtime.MemStats
	var shrink []string
	for range 4 {
		runtime.GC()
		runtime.ReadMemStats(&ms)
		shrink = append(shrink, fmt.Sprint(ms.StackInuse))
	}
	for _, name := range []string{"heap", "goroutine"} {
		f, err := os.Create(filepath.Join(dir, name+".pprof"))
		if err != nil {
			return err
		}
		err = pprof.Lookup(name).WriteTo(f, 0)
		f.Close()
		if err != nil {
			return err
		}
	}
	runtime.ReadMemStats(&ms)
	s := fmt.Sprintf("StackInuse after 1..4 GCs %%s\ngoroutines %d\nHeapAlloc %d\nHeapInuse %d\nHeapIdle %d\nHeapReleased %d\nStackInuse %d\nSys %d\nNumGC %d\n",
		runtime.NumGoroutine(), ms.HeapAlloc, ms.HeapInuse, ms.HeapIdle, ms.HeapReleased, ms.StackInuse, ms.Sys, ms.NumGC)
	s = fmt.Sprintf(s, strings.Join(shrink, " "))
	s += memoryClasses()
	tmp := filepath.Join(dir, "memstats.txt.tmp")
	if err := os.WriteFile(tmp, []byte(s), 0o600); err != nil {
		return err
	}
	// Renamed last: the benchmark waits for this file.
	return os.Rename(tmp, filepath.Join(dir, "memstats.txt"))
}

// memoryClasses returns runtime/metrics' /memory/classes/* (where every
// byte the runtime mapped goes), one per line.
func memoryClasses() string {
	var samples []metrics.Sample
	for _, d := range metrics.All() {
		if strings.HasPrefix(d.Name, "/memory/classes/") || d.Name == "/gc/stack/starting-size:bytes" {
			samples = append(samples, metrics.Sample{Name: d.Name})
		}
	}
	metrics.Read(samples)
	var b strings.Builder
	for _, s := range samples {
		if s.Value.Kind() == metrics.KindUint64 {
			fmt.Fprintf(&b, "%s %d\n", s.Name, s.Value.Uint64())
		}
	}
	return b.String()
}
