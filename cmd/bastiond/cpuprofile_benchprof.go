//go:build benchprof

package main

import (
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"syscall"
)

// Only in binaries built with -tags benchprof (integration/powercut builds
// one when BENCH_PROFILE_DIR is set): SIGUSR2 starts a CPU profile, the next
// SIGUSR2 stops it and renames it to $BASTIOND_PROFILE_DIR/cpu-<n>.pprof
// (n counts from 1), so a benchmark can profile exactly the span it
// measures. Nothing is reachable over the network.
func init() {
	dir := os.Getenv("BASTIOND_PROFILE_DIR")
	if dir == "" {
		return
	}
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGUSR2)
	go func() {
		var f *os.File
		n := 0
		for range ch {
			if f == nil {
				n++
				var err error
				f, err = os.Create(filepath.Join(dir, fmt.Sprintf("cpu-%d.pprof.tmp", n)))
				if err == nil {
					err = pprof.StartCPUProfile(f)
				}
				if err != nil {
					fmt.Fprintf(os.Stderr, "bastiond: cpu profile: %v\n", err)
					if f != nil {
						f.Close()
						f = nil
					}
				}
				continue
			}
			pprof.StopCPUProfile()
			err := f.Close()
			if err == nil {
				// Renamed last: the benchmark waits for this file.
				err = os.Rename(f.Name(), filepath.Join(dir, fmt.Sprintf("cpu-%d.pprof", n)))
			}
			if err != nil {
				fmt.Fprintf(os.Stderr, "bastiond: cpu profile: %v\n", err)
			}
			f = nil
		}
	}()
}
