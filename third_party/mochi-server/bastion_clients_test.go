package mqtt

import (
	"strconv"
	"sync"
	"testing"
	"time"
)

// TestBastionGetByListenerWithWriters (Bastion patch (11)): GetByListener
// took the clients' read lock twice (through Len); a writer (a session
// ending, a new one added) that came between the two made the second wait
// for it while it waited for the first: shutdown, which lists a listener's
// clients, deadlocked with sessions ending. Writers and GetByListener run
// side by side here, bounded in count and time.
func TestBastionGetByListenerWithWriters(t *testing.T) {
	cls := NewClients()
	for i := 0; i < 64; i++ {
		c, _, _ := newTestClient()
		c.ID = strconv.Itoa(i)
		c.Net.Listener = "tls"
		cls.Add(c)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			c, _, _ := newTestClient()
			c.ID = "w" + strconv.Itoa(w)
			for {
				select {
				case <-stop:
					return
				default:
				}
				cls.Add(c)
				cls.Delete(c.ID)
			}
		}(w)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 200000; i++ {
			cls.GetByListener("tls")
		}
	}()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("GetByListener deadlocked with the writers")
	}
	close(stop)
	wg.Wait()
}
