"""The software CPU. The KVM backend borrows it, one instruction at a time, for what the host's KVM cannot
execute (`popek.accel.kvm_softcpu`), and its XSAVE model (`xsave`) for the XSAVE family."""
