package netns

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/bastion-iot/bastion/internal/testenv"
)

func TestPathRefusesEscapes(t *testing.T) {
	for _, bad := range []string{"", ".", "..", "../etc", "a/b", "x\x00"} {
		if _, err := Path(bad); err == nil {
			t.Errorf("Path(%q) accepted", bad)
		}
	}
	if p, err := Path("gw"); err != nil || p != "/run/netns/gw" {
		t.Errorf("Path(gw) = %q, %v", p, err)
	}
}

func TestDoEntersAndLeaves(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	name := "bst-nsunit-" + strings.TrimPrefix(t.Name(), "Test")[:4]
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	self, err := os.Readlink("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	var inside string
	if err := Do(name, func() error {
		var err error
		inside, err = os.Readlink("/proc/thread-self/ns/net")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if inside == self {
		t.Errorf("inside Do the thread is still in %s", self)
	}
	if after, _ := os.Readlink("/proc/thread-self/ns/net"); after != self {
		t.Errorf("after Do the thread is in %s, want %s", after, self)
	}
	if err := Do("bst-does-not-exist", func() error { return nil }); err == nil {
		t.Error("Do into a missing namespace succeeded")
	}
}
