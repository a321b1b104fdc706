//go:build benchprof

package main

import (
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strings"
	"syscall"
)

// Only in binaries built with -tags benchprof (bridges/bench builds one when
// BENCH_PROFILE_DIR is set): on SIGUSR1 write heap and goroutine profiles
// and the runtime's memory statistics to $BASTIOND_PROFILE_DIR; SIGUSR2
// starts a CPU profile (cpu-N.pprof there) and the next SIGUSR2 ends it.
// Nothing is reachable over the network; the production binary has none of
// this.
func init() {
	dir := os.Getenv("BASTIOND_PROFILE_DIR")
	if dir == "" {
		return
	}
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGUSR1, syscall.SIGUSR2)
	go func() {
		var cpu *os.File
		n := 0
		for sig := range ch {
			var err error
			switch {
			case sig == syscall.SIGUSR1:
				err = writeProfiles(dir)
			case cpu == nil:
				n++
				if cpu, err = os.Create(filepath.Join(dir, fmt.Sprintf("cpu-%d.pprof", n))); err == nil {
					if err = pprof.StartCPUProfile(cpu); err != nil {
						cpu.Close()
						cpu = nil
					}
				}
			default:
				pprof.StopCPUProfile()
				err = cpu.Close()
				cpu = nil
			}
			if err != nil {
				fmt.Fprintf(os.Stderr, "bastiond: profiles: %v\n", err)
			}
		}
	}()
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
	tmp := filepath.Join(dir, "memstats.txt.tmp")
	if err := os.WriteFile(tmp, []byte(s), 0o600); err != nil {
		return err
	}
	// Renamed last: the benchmark waits for this file.
	return os.Rename(tmp, filepath.Join(dir, "memstats.txt"))
}
