/* Experiment (kept with its results, not a tool): round trip of one byte over a socketpair
 * between two processes, pinned to given CPUs (-1: not pinned). cc -O2 wakeup-pingpong.c;
 * ./a.out CPU_A CPU_B */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <sys/wait.h>
static void pin(int c){ if(c<0) return; cpu_set_t s; CPU_ZERO(&s); CPU_SET(c,&s); sched_setaffinity(0,sizeof s,&s);}
int main(int argc,char**argv){ int a=atoi(argv[1]), b=atoi(argv[2]); int n=20000; int sv[2]; socketpair(AF_UNIX,SOCK_STREAM,0,sv);
 if(fork()==0){ pin(b); char c; for(int i=0;i<n;i++){ read(sv[1],&c,1); write(sv[1],&c,1);} _exit(0);} 
 pin(a); char c='x'; struct timespec t0,t1; clock_gettime(CLOCK_MONOTONIC,&t0);
 for(int i=0;i<n;i++){ write(sv[0],&c,1); read(sv[0],&c,1);} clock_gettime(CLOCK_MONOTONIC,&t1);
 printf("cpu %d<->%d: %.1f us per round trip\n",a,b,((t1.tv_sec-t0.tv_sec)*1e9+(t1.tv_nsec-t0.tv_nsec))/n/1000.0); wait(0); }
