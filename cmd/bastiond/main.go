// Command bastiond is the Bastion gateway daemon. It parses flags, handles
// signals and hands everything else to gateway.Run.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/bastion-iot/bastion/gateway"
	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/internal/buildinfo"
)

func main() { os.Exit(run()) }

func run() int {
	var (
		dev         = flag.Bool("dev", false, "run the whole gateway on loopback with a local state directory; no root, no firewall changes")
		state       = flag.String("state", "bastion-dev", "state directory for --dev")
		cfgPath     = flag.String("config", "", "configuration file (production default /etc/bastion/bastion.yaml; --dev default STATE/bastion.yaml)")
		check       = flag.String("check-config", "", "validate this configuration file, print the verdict and exit")
		writeConfig = flag.String("write-default-config", "", "write a commented default production configuration to this file and exit")
		version     = flag.Bool("version", false, "print the version and exit")
	)
	flag.Parse()
	switch {
	case *version:
		fmt.Println("bastiond", buildinfo.Version)
		return 0
	case *check != "":
		base := config.Production()
		_, warnings, err := config.LoadWithWarnings(*check, base)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%v\n%s: configuration refused\n", err, *check)
			return 1
		}
		for _, w := range warnings {
			fmt.Fprintf(os.Stderr, "warning: %v\n", w)
		}
		fmt.Printf("%s: configuration OK\n", *check)
		return 0
	case *writeConfig != "":
		if _, err := os.Stat(*writeConfig); err == nil {
			fmt.Fprintf(os.Stderr, "%s exists; not overwriting it\n", *writeConfig)
			return 1
		}
		if err := gateway.WriteConfigFile(*writeConfig, config.Production()); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		return 0
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	reload := make(chan struct{}, 1)
	go func() {
		for range hup {
			select {
			case reload <- struct{}{}:
			default:
			}
		}
	}()

	g, err := gateway.New(gateway.Options{Dev: *dev, StateDir: *state, ConfigPath: *cfgPath, Reload: reload})
	if err != nil {
		fmt.Fprintf(os.Stderr, "bastiond: %v\n", err)
		return 1
	}
	done := make(chan error, 1)
	go func() { done <- g.Run(ctx) }()
	select {
	case err = <-done:
	case <-ctx.Done():
		// Graceful shutdown has a deadline: a stuck component does not keep
		// the box from restarting.
		select {
		case err = <-done:
		case <-time.After(15 * time.Second):
			fmt.Fprintln(os.Stderr, "bastiond: shutdown deadline passed; exiting")
			return 1
		}
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintf(os.Stderr, "bastiond: %v\n", err)
		return 1
	}
	return 0
}
