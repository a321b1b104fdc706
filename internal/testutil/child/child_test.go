package child

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"testing"
)

// helperEnv makes the test binary the "test" whose death is simulated: it
// starts the long-lived child, prints its pid and waits to be killed.
const helperEnv = "BASTION_CHILD_HELPER"

// TestDieWithTest kills a test binary with SIGKILL, so that no cleanup runs
// (as a -timeout panic or the OOM killer would), and checks that the
// long-lived child it started with DieWithTest ends too.
func TestDieWithTest(t *testing.T) {
	if os.Getenv(helperEnv) == "1" {
		sleep := DieWithTest(exec.Command("sleep", "600"))
		if err := sleep.Start(); err != nil {
			fmt.Println("start:", err)
			os.Exit(1)
		}
		fmt.Println(sleep.Process.Pid)
		// Killed here by the test; stdin never ends before that.
		bufio.NewReader(os.Stdin).ReadString('\n')
		os.Exit(1)
	}
	CheckEndsWithParent(t, func() *exec.Cmd {
		cmd := exec.Command(os.Args[0], "-test.run=^TestDieWithTest$", "-test.count=1")
		cmd.Env = append(os.Environ(), helperEnv+"=1", "TMPDIR="+t.TempDir())
		return cmd
	})
}
